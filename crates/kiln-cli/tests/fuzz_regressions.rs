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
fn checkpoint_inputs() {
    replay("checkpoint", targets::checkpoint);
}

#[test]
fn layout_inputs() {
    replay("layout", targets::layout);
}
