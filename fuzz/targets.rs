// The bodies of kiln's fuzz targets. Compiled into the cargo-fuzz targets
// (fuzz/fuzz_targets/*.rs) and, on stable, into the regression test that
// replays every saved input (crates/kiln-cli/tests/fuzz_regressions.rs).
// Each must return normally for any input: a clean `Err` is fine; a panic,
// an overflow or an out-of-bounds access is a bug.

/// One single-threaded reference backend for every input: a backend per
/// input started (and dropped) a worker thread each time, which is slow and
/// which LeakSanitizer reports as a leak (the thread-local destructor
/// record of a thread still exiting).
fn backend() -> kiln_cpu::CpuBackend {
    static B: std::sync::OnceLock<kiln_cpu::CpuBackend> = std::sync::OnceLock::new();
    B.get_or_init(|| {
        kiln_cpu::CpuBackend::reference()
            .with_threads(1)
            .expect("the reference starts no worker pool")
    })
    .clone()
}

/// The IDX reader, raw or gzip, and dataset assembly from what it decodes.
pub fn idx(data: &[u8]) {
    if let Ok(a) = kiln_data::idx::decode(data) {
        let n: usize = a.dims.iter().product();
        assert_eq!(n, a.data.len(), "decoded length disagrees with the dimensions");
        let labels = kiln_data::IdxArray { dims: a.dims.first().map(|&d| vec![d]).unwrap_or_default(), data: a.data.iter().take(a.dims.first().copied().unwrap_or(0)).copied().collect() };
        if let Ok(ds) = kiln_data::Dataset::from_idx("fuzz", a, labels, 256) {
            for i in 0..ds.len().min(4) {
                assert_eq!(ds.image(i).len(), ds.pixels());
            }
        }
    }
}

/// The model-spec parser: any spec that plans must build and run.
pub fn model_spec(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(spec) = kiln_nn::ModelSpec::from_json(text) else { return };
    let Ok((out, params)) = spec.plan() else { return };
    let pixels: usize = spec.input.iter().product();
    if params > 1 << 16 || pixels > 1 << 12 || out.iter().product::<usize>() > 1 << 16 {
        return; // valid, but too big to build on every fuzz iteration
    }
    let b = backend();
    let model = kiln_nn::Sequential::from_spec(&spec, 0, &b).expect("a spec that plans builds");
    let mut dims = vec![2];
    dims.extend_from_slice(&spec.input);
    let x = kiln_core::Tensor::zeros(&dims, kiln_core::DType::F32, &b).expect("small input");
    let y = model.forward(&x).expect("a built model runs on its input shape");
    assert_eq!(&y.dims()[1..], &out[..], "plan and forward disagree on the output shape");
}

/// Model files (safetensors with a kiln spec): any bytes load or fail cleanly.
pub fn model_file(data: &[u8]) {
    let b = backend();
    if let Ok(loaded) = kiln_train::model_file::from_bytes(data, &b) {
        assert!(loaded.model.num_params() * 4 <= data.len());
    }
}

/// Checkpoints (model file + optimiser tensors + progress JSON): any bytes
/// load or fail cleanly, and a loaded optimiser state fits its model.
pub fn checkpoint(data: &[u8]) {
    let b = backend();
    if let Ok((model, state, _)) = kiln_train::checkpoint::from_bytes(data, &b) {
        let mut adam = kiln_nn::Adam::<kiln_cpu::CpuBackend>::new(1e-3).expect("a valid rate");
        let _ = kiln_nn::Optimizer::load_state(&mut adam, &state, &model.params());
    }
}

/// Shape, broadcast and layout arithmetic on arbitrary extents, strides and offsets.
pub fn layout(data: &[u8]) {
    use kiln_core::{Layout, Shape};
    let mut words = data.chunks(4).map(|c| {
        let mut w = [0u8; 4];
        w[..c.len()].copy_from_slice(c);
        u32::from_le_bytes(w) as usize
    });
    let mut next = move || words.next().unwrap_or(0);
    // Small extents usually, huge ones sometimes (the high bit picks).
    let extent = |w: usize| if w & 0x8000_0000 != 0 { w << 20 } else { w % 9 };
    let rank = next() % 6;
    let dims: Vec<usize> = (0..rank).map(|_| extent(next())).collect();
    let other: Vec<usize> = (0..next() % 6).map(|_| extent(next())).collect();
    let (Ok(shape), Ok(other)) = (Shape::new(&dims), Shape::new(&other)) else { return };
    let _ = Shape::broadcast("fuzz", &shape, &other);
    let strides: Vec<usize> = (0..rank).map(|_| { let w = next(); if w & 1 == 0 { w % 64 } else { w << 24 } }).collect();
    let offset = next() % 4096;
    let Ok(layout) = Layout::new(shape.clone(), strides, offset) else { return };
    let span = layout.span().expect("a valid layout has a span");
    let mut views = vec![layout.clone(), Layout::contiguous(shape.clone())];
    let (a, c) = (next() % 7, next() % 7);
    views.extend(layout.transpose(a, c).ok());
    let (d, s, l) = (next() % 7, next() % 9, next() % 9);
    views.extend(layout.narrow(d, s, l).ok());
    let mut perm: Vec<usize> = (0..rank).collect();
    perm.rotate_left(next() % rank.max(1));
    views.extend(layout.permute(&perm).ok());
    views.extend(layout.broadcast_as(&other).ok());
    views.extend(layout.reshape(&other).ok().flatten());
    for v in &views {
        let vspan = v.span().expect("derived views have spans");
        if v.numel() <= 4096 {
            v.for_each_offset(|o| assert!(o < vspan.max(1), "offset {o} past the span {vspan}"));
        }
        if std::ptr::eq(v, &views[0]) {
            assert_eq!(vspan, span);
        }
    }
}

/// Safetensors headers as structure: the input is the header's JSON, a
/// 0xFF byte, then the tensor data; the target frames them (the 8-byte
/// length) so mutations explore the JSON — names, dtypes, shapes,
/// offsets, the spec, checksums and progress metadata — instead of dying
/// on the framing. Seeded from a valid model's and checkpoint's headers.
pub fn model_header(data: &[u8]) {
    let split = data.iter().position(|&b| b == 0xFF).unwrap_or(data.len());
    let (header, rest) = data.split_at(split);
    let tensors = rest.get(1..).unwrap_or(&[]);
    let mut file = Vec::with_capacity(8 + data.len());
    file.extend_from_slice(&(header.len() as u64).to_le_bytes());
    file.extend_from_slice(header);
    file.extend_from_slice(tensors);
    model_file(&file);
    checkpoint(&file);
}
