//! Datasets and loaders against real files.

use std::path::Path;
use std::sync::Arc;

use kiln_core::{DataError, Error};
use kiln_data::{DataLoader, Dataset, Split};

fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, 0x08, dims.len() as u8];
    for d in dims {
        v.extend_from_slice(&d.to_be_bytes());
    }
    v.extend_from_slice(data);
    v
}

fn write_split(dir: &Path, images: Vec<u8>, labels: Vec<u8>) {
    std::fs::write(dir.join("train-images-idx3-ubyte"), images).unwrap();
    std::fs::write(dir.join("train-labels-idx1-ubyte"), labels).unwrap();
}

fn data_error(r: Result<Dataset, Error>) -> DataError {
    match r {
        Err(Error::Data { source, .. }) => source,
        other => panic!("expected a data error, got {other:?}"),
    }
}

#[test]
fn bundled_sample_is_complete_and_stratified() {
    let train = Dataset::bundled_sample(Split::Train).unwrap();
    let test = Dataset::bundled_sample(Split::Test).unwrap();
    assert_eq!((train.len(), test.len()), (8000, 2000));
    assert_eq!(train.example_shape(), [1, 28, 28]);
    let mut per_class = [0usize; 10];
    test.labels()
        .iter()
        .for_each(|&l| per_class[l as usize] += 1);
    assert_eq!(
        per_class,
        [200, 225, 198, 206, 196, 173, 203, 214, 189, 196]
    );
    // Real digits: mostly background, some ink.
    let ink = train.image(0).iter().filter(|&&p| p > 128).count();
    assert!((50..400).contains(&ink), "{ink}");
}

#[test]
fn on_disk_files_load_and_each_defect_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_split(
        d,
        idx(&[2, 2, 2], &[0, 1, 2, 3, 4, 5, 6, 7]),
        idx(&[2], &[3, 9]),
    );
    let ds = Dataset::from_dir("t", d, Split::Train).unwrap();
    assert_eq!((ds.len(), ds.image(1)), (2, &[4u8, 5, 6, 7][..]));

    // Truncated images.
    write_split(d, idx(&[2, 2, 2], &[0, 1, 2]), idx(&[2], &[3, 9]));
    assert!(matches!(
        data_error(Dataset::from_dir("t", d, Split::Train)),
        DataError::Truncated { .. }
    ));
    // Wrong magic.
    let mut bad = idx(&[2, 2, 2], &[0; 8]);
    bad[0] = 0x42;
    write_split(d, bad, idx(&[2], &[3, 9]));
    assert!(matches!(
        data_error(Dataset::from_dir("t", d, Split::Train)),
        DataError::BadMagic { .. }
    ));
    // Dimension/size mismatch: images declared as a matrix.
    write_split(d, idx(&[2, 4], &[0; 8]), idx(&[2], &[3, 9]));
    assert!(matches!(
        data_error(Dataset::from_dir("t", d, Split::Train)),
        DataError::BadDimensions(_)
    ));
    // Label count differs from image count.
    write_split(d, idx(&[2, 2, 2], &[0; 8]), idx(&[3], &[3, 9, 1]));
    assert!(matches!(
        data_error(Dataset::from_dir("t", d, Split::Train)),
        DataError::CountMismatch {
            images: 2,
            labels: 3
        }
    ));
    // A label outside the 10 classes.
    write_split(d, idx(&[2, 2, 2], &[0; 8]), idx(&[2], &[3, 10]));
    assert!(matches!(
        data_error(Dataset::from_dir("t", d, Split::Train)),
        DataError::LabelOutOfRange {
            label: 10,
            index: 1,
            ..
        }
    ));
    // The message names the file and says what is wrong.
    write_split(d, idx(&[2, 2, 2], &[0, 1, 2]), idx(&[2], &[3, 9]));
    let msg = Dataset::from_dir("t", d, Split::Train)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("train-images-idx3-ubyte") && msg.contains("truncated"),
        "{msg}"
    );
}

#[test]
fn missing_and_unknown_datasets_say_what_to_do() {
    let e = Dataset::load("cifar", Split::Train, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown dataset `cifar`"), "{e}");
    // Without --data the sample is always there.
    assert_eq!(
        Dataset::load("mnist-sample", Split::Test, None)
            .unwrap()
            .len(),
        2000
    );
}

#[test]
fn an_explicit_data_folder_is_used_exactly_or_refused() {
    let dir = tempfile::tempdir().unwrap();
    let err = |name: &str, split: Split, d: &Path| {
        Dataset::load(name, split, Some(d)).unwrap_err().to_string()
    };
    // Missing, a file, empty: each says so, and nothing else is loaded in
    // its place (not the system's copy, not the bundled sample).
    let e = err("fashion-mnist", Split::Train, &dir.path().join("absent"));
    assert!(e.contains("absent: does not exist"), "{e}");
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let e = err("mnist", Split::Train, &file);
    assert!(e.contains("a-file: is not a folder"), "{e}");
    let e = err("mnist-sample", Split::Train, dir.path());
    assert!(
        e.contains("no train-images-idx3-ubyte[.gz] there")
            && e.contains("train-labels-idx1-ubyte.gz"),
        "{e}"
    );
    // A folder with only the train split: train loads, test is refused
    // (not mixed in from elsewhere).
    write_split(dir.path(), idx(&[2, 2, 2], &[0; 8]), idx(&[2], &[1, 2]));
    assert_eq!(
        Dataset::load("mnist", Split::Train, Some(dir.path()))
            .unwrap()
            .len(),
        2
    );
    let e = err("mnist", Split::Test, dir.path());
    assert!(e.contains("no t10k-images-idx3-ubyte[.gz]"), "{e}");
}

#[test]
fn a_dataset_of_no_images_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_split(dir.path(), idx(&[0, 28, 28], &[]), idx(&[0], &[]));
    match data_error(Dataset::load("mnist", Split::Train, Some(dir.path()))) {
        DataError::BadDimensions(m) => assert!(m.contains("0 images"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn loader_order_is_seeded_and_covers_every_example() {
    let ds = Arc::new(Dataset::bundled_sample(Split::Test).unwrap());
    let a = DataLoader::new(Arc::clone(&ds), 128).shuffle(5);
    let b = DataLoader::new(Arc::clone(&ds), 128).shuffle(5);
    assert_eq!(a.order(3), b.order(3));
    assert_ne!(a.order(3), a.order(4));
    let batches: Vec<_> = a.epoch(3).collect();
    assert_eq!(batches.len(), 16);
    assert_eq!(batches.last().unwrap().len, 2000 - 15 * 128);
    let mut seen: Vec<u32> = a.order(3);
    seen.sort_unstable();
    assert_eq!(seen, (0..2000).collect::<Vec<_>>());
    // Batches carry the examples of the order, scaled to [0, 1].
    let first = a.order(3)[0] as usize;
    assert_eq!(batches[0].labels[0], ds.labels()[first]);
    let expected: Vec<f32> = ds
        .image(first)
        .iter()
        .map(|&p| f32::from(p) / 255.0)
        .collect();
    assert!(
        batches[0].images[..784] == expected[..],
        "first image differs"
    );
    // Dropping an epoch early stops its worker.
    let mut it = a.epoch(0);
    it.next();
    drop(it);
}
