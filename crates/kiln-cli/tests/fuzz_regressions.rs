//! Replays every saved fuzz input (fuzz/regressions/<target>/) through the
//! same target bodies cargo-fuzz runs, so a fixed crash stays fixed.

#[allow(dead_code)]
mod targets {
    include!("../../../fuzz/targets.rs");
}

fn replay(target: &str, run: fn(&[u8])) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/regressions")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        if let Err(e) = std::panic::catch_unwind(|| run(&data)) {
            panic!("{} panics again: {e:?}", path.display());
        }
        n += 1;
    }
    assert!(n > 0, "no saved inputs in {}", dir.display());
}

#[test]
fn idx_inputs() {
    replay("idx", targets::idx);
}

#[test]
fn model_spec_inputs() {
    replay("model_spec", targets::model_spec);
}

#[test]
fn model_file_inputs() {
    replay("model_file", targets::model_file);
}

#[test]
fn model_header_inputs() {
    replay("model_header", targets::model_header);
}

#[test]
fn checkpoint_inputs() {
    replay("checkpoint", targets::checkpoint);
}

#[test]
fn layout_inputs() {
    replay("layout", targets::layout);
}

/// The seeds the fuzzers start from must get past the header: a small
/// valid model file and checkpoint (under the fuzzers' 64 KiB input
/// limit), which load. (`fuzz/README.md` says how they were made.)
#[test]
fn the_seeds_are_small_valid_files_that_load() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/regressions");
    let b = kiln_cpu::CpuBackend::reference()
        .with_threads(1)
        .expect("worker threads");
    let model = std::fs::read(dir.join("model_file/tiny.safetensors")).unwrap();
    assert!(model.len() < 65536);
    kiln_train::model_file::from_bytes(&model, &b).expect("the model seed loads");
    let ckpt = std::fs::read(dir.join("checkpoint/tiny-ckpt.safetensors")).unwrap();
    assert!(ckpt.len() < 65536);
    kiln_train::checkpoint::from_bytes(&ckpt, &b).expect("the checkpoint seed loads");
    // The structured seeds frame back into the same files.
    for (seed, file) in [("tiny-model", &model), ("tiny-checkpoint", &ckpt)] {
        let s = std::fs::read(dir.join("model_header").join(seed)).unwrap();
        let split = s.iter().position(|&b| b == 0xFF).unwrap();
        let mut framed = (split as u64).to_le_bytes().to_vec();
        framed.extend_from_slice(&s[..split]);
        framed.extend_from_slice(&s[split + 1..]);
        assert_eq!(&framed, file, "{seed}");
    }
}
