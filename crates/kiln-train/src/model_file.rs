//! Trained models on disk: the weights in safetensors, the model spec and run
//! facts in its metadata. Files are written atomically: a temporary file in
//! the same folder, flushed to disk, renamed over the target, and the folder
//! synced — a crash leaves either the old file or the new one, never half.
//!
//! ```
//! use std::collections::HashMap;
//! use kiln_cpu::CpuBackend;
//! use kiln_nn::ModelSpec;
//! use kiln_train::model_file;
//!
//! let b = CpuBackend::reference();
//! let model = ModelSpec::mlp().build(3, &b)?;
//! let dir = tempfile::tempdir().unwrap();
//! let path = dir.path().join("mlp.safetensors");
//! model_file::save(&path, &model, &HashMap::new())?; // atomic: the old file or the new, never half
//! let loaded = model_file::load(&path, &b)?.model;
//! assert_eq!(loaded.spec(), model.spec());
//! // A damaged file is refused with a reason.
//! let bytes = std::fs::read(&path).unwrap();
//! std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
//! assert!(model_file::load(&path, &b).is_err());
//! # Ok::<(), kiln_core::Error>(())
//! ```

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_core::{Backend, DType, DataError, Error, HostData, Layout, Result, Shape, Tensor};
use kiln_nn::{ModelSpec, Sequential};
use safetensors::{tensor::TensorView, SafeTensors};

/// The metadata key holding the model spec (JSON).
pub const SPEC_KEY: &str = "kiln.spec";
/// The metadata key holding the kiln version that wrote the file.
pub const VERSION_KEY: &str = "kiln.version";
/// The metadata key holding the seed the model was built from (its dropout
/// streams depend on it).
pub const MODEL_SEED_KEY: &str = "kiln.model_seed";

/// The metadata key holding each tensor's checksum (JSON: name → hex
/// FNV-1a-64 of its bytes), verified on load.
pub const CHECKSUMS_KEY: &str = "kiln.checksums";

/// FNV-1a, 64-bit, of `bytes`, as 16 hex digits: catches flipped bytes in
/// a tensor's data (it is no defence against deliberate tampering).
pub fn checksum(bytes: &[u8]) -> String {
    let h = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{h:016x}")
}

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename, fsync of the folder).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let io = |what: &str, e| Error::io(format!("{what} {}", path.display()), e);
    let name = path
        .file_name()
        .ok_or_else(|| Error::invalid(format!("{} is not a file path", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f =
            std::fs::File::create(&tmp).map_err(|e| io("creating a temporary file for", e))?;
        f.write_all(bytes).map_err(|e| io("writing", e))?;
        f.sync_all().map_err(|e| io("syncing", e))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(|e| io("renaming into", e))?;
        // Make the rename itself durable.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Removes the temporary files [`write_atomic`] leaves in `dir` when its
/// process is killed mid-write (`.NAME.tmp-PID`), and returns them. A
/// temporary whose process still runs is kept (on Linux, by `/proc`;
/// elsewhere, one modified within the last hour). A missing `dir` has none.
pub fn remove_stale_temporaries(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(format!("listing {}", dir.display()), e)),
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let pid = name
            .to_str()
            .and_then(|n| n.strip_prefix('.'))
            .and_then(|n| n.rsplit_once(".tmp-"))
            .and_then(|(_, pid)| pid.parse::<u32>().ok());
        let Some(pid) = pid else { continue };
        if pid == std::process::id() || writer_may_live(pid, &entry) {
            continue;
        }
        let path = entry.path();
        std::fs::remove_file(&path).map_err(|e| {
            Error::io(
                format!("removing the stale temporary {}", path.display()),
                e,
            )
        })?;
        removed.push(path);
    }
    Ok(removed)
}

/// Whether the process that wrote a temporary may still be writing it.
fn writer_may_live(pid: u32, entry: &std::fs::DirEntry) -> bool {
    if cfg!(target_os = "linux") {
        Path::new(&format!("/proc/{pid}")).exists()
    } else {
        entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_none_or(|age| age.as_secs() < 3600)
    }
}

/// Saves `model`'s weights and spec to `path`, with `extra` metadata.
pub fn save<B: Backend>(
    path: &Path,
    model: &Sequential<B>,
    extra: &HashMap<String, String>,
) -> Result<()> {
    save_with(path, model, extra, &[])
}

/// [`save`] with more tensors beside the weights (a checkpoint's
/// optimiser state): `(name, dims, data)`.
pub fn save_with<B: Backend>(
    path: &Path,
    model: &Sequential<B>,
    extra: &HashMap<String, String>,
    tensors: &[(String, Vec<usize>, HostData)],
) -> Result<()> {
    let mut host = Vec::new();
    for (name, p) in model.named_params() {
        let data = p.value().to_host()?;
        host.push((name, p.shape().dims().to_vec(), data));
    }
    host.extend(tensors.iter().cloned());
    let views: Vec<(String, TensorView<'_>)> = host
        .iter()
        .map(|(name, dims, data)| {
            let dtype = match data.dtype() {
                DType::F32 => safetensors::Dtype::F32,
                DType::F16 => safetensors::Dtype::F16,
                DType::BF16 => safetensors::Dtype::BF16,
                DType::U32 => safetensors::Dtype::U32,
            };
            TensorView::new(dtype, dims.clone(), data.as_bytes())
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::invalid(format!("saving {name}: {e}")))
        })
        .collect::<Result<_>>()?;
    let mut meta = extra.clone();
    let sums: std::collections::BTreeMap<&str, String> = host
        .iter()
        .map(|(name, _, data)| (name.as_str(), checksum(data.as_bytes())))
        .collect();
    meta.insert(
        CHECKSUMS_KEY.into(),
        serde_json::to_string(&sums).map_err(|e| Error::invalid(e.to_string()))?,
    );
    meta.insert(SPEC_KEY.into(), model.spec().to_json());
    meta.insert(VERSION_KEY.into(), env!("CARGO_PKG_VERSION").into());
    meta.insert(MODEL_SEED_KEY.into(), model.seed().to_string());
    let bytes = safetensors::serialize(views, &Some(meta))
        .map_err(|e| Error::invalid(format!("serialising {}: {e}", path.display())))?;
    write_atomic(path, &canonical_header(bytes)?)
}

/// The same safetensors bytes with the JSON header's keys in sorted order
/// (the crate writes its metadata in hash-map order, so identical models
/// gave different files): identical runs now give identical files, and a
/// file's sha256 identifies it. The header keeps its length (only the
/// order of its entries changes) and so every data offset.
fn canonical_header(mut bytes: Vec<u8>) -> Result<Vec<u8>> {
    let bad = || Error::invalid("safetensors wrote a header it cannot read back".to_string());
    let n = bytes
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_le_bytes)
        .and_then(|n| usize::try_from(n).ok())
        .filter(|&n| 8 + n <= bytes.len())
        .ok_or_else(bad)?;
    // serde_json's maps are sorted (no `preserve_order`), recursively.
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).map_err(|_| bad())?;
    let sorted = serde_json::to_vec(&header).map_err(|_| bad())?;
    if sorted.len() > n {
        return Err(bad());
    }
    bytes[8..8 + sorted.len()].copy_from_slice(&sorted);
    bytes[8 + sorted.len()..8 + n].fill(b' ');
    Ok(bytes)
}

/// A model loaded from disk, with the file's metadata.
pub struct Loaded<B: Backend> {
    /// The rebuilt model with the saved weights.
    pub model: Sequential<B>,
    /// Every metadata entry of the file.
    pub metadata: HashMap<String, String>,
}

/// The `__metadata__` of the safetensors file at `path`, reading its
/// header alone (8 bytes of length, then the JSON), not the tensors
/// after it: what a caller asks before loading a checkpoint of hundreds of
/// megabytes. `None` where the file is not a safetensors file (too short,
/// a header past its end or over safetensors' 100 MB, not JSON); a file
/// that cannot be opened or read is an error naming it as `what`.
pub fn read_metadata(path: &Path, what: &str) -> Result<Option<HashMap<String, String>>> {
    use std::io::Read;
    /// safetensors' own limit on a header.
    const MAX_HEADER: u64 = 100_000_000;
    let io = |e| Error::io(format!("reading {what} {}", path.display()), e);
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut len = [0u8; 8];
    let mut header = Vec::new();
    match file.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(io(e)),
    }
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER {
        return Ok(None);
    }
    file.take(n).read_to_end(&mut header).map_err(io)?;
    if header.len() as u64 != n {
        return Ok(None);
    }
    let Ok(serde_json::Value::Object(mut fields)) = serde_json::from_slice(&header) else {
        return Ok(None);
    };
    Ok(match fields.remove("__metadata__") {
        None => Some(HashMap::new()),
        Some(m) => serde_json::from_value(m).ok(),
    })
}

/// Loads a model saved by [`save`], checking every tensor against the spec.
pub fn load<B: Backend>(path: &Path, backend: &B) -> Result<Loaded<B>> {
    let bytes = kiln_core::files::read(path, "model file")?;
    from_bytes(&bytes, backend).map_err(|e| match e {
        Error::InvalidArgument(msg) => Error::Data {
            path: path.to_path_buf(),
            source: DataError::Invalid(msg),
        },
        other => other,
    })
}

/// Loads a model to evaluate or serve from `path`: a model file, the folder
/// `kiln train` wrote it to (its `model.safetensors`; an interrupted run's
/// folder, which has none yet, its newest checkpoint), a checkpoint (its
/// optimiser state ignored) or a folder of checkpoints (its newest, as
/// `--resume` takes it). Returns the model and the file read; errors name
/// the file.
pub fn load_for_inference<B: Backend>(path: &Path, backend: &B) -> Result<(Loaded<B>, PathBuf)> {
    let file = if path.is_dir() {
        let model = path.join("model.safetensors");
        let newest = |dir: &Path| -> Result<Option<PathBuf>> {
            match dir.is_dir() {
                true => Ok(crate::checkpoint::list(dir)?.pop()),
                false => Ok(None),
            }
        };
        if model.exists() {
            model
        } else if let Some(newest) = newest(path)?.or(newest(&path.join("checkpoints"))?) {
            newest
        } else {
            model
        }
    } else {
        path.to_path_buf()
    };
    let bytes = kiln_core::files::read(&file, "model file")?;
    let loaded = from_bytes_with_extra(&bytes, backend, "optimizer.")
        .map_err(|e| Error::invalid(format!("{}: {e}", file.display())))?;
    Ok((
        Loaded {
            model: loaded.model,
            metadata: loaded.metadata,
        },
        file,
    ))
}

/// Loads a model from the bytes of a model file.
pub fn from_bytes<B: Backend>(bytes: &[u8], backend: &B) -> Result<Loaded<B>> {
    let l = from_bytes_with_extra(bytes, backend, "\0")?;
    Ok(Loaded {
        model: l.model,
        metadata: l.metadata,
    })
}

/// A model file's contents with the tensors beyond the weights.
pub struct LoadedWithExtra<B: Backend> {
    /// The rebuilt model with the saved weights.
    pub model: Sequential<B>,
    /// Every metadata entry of the file.
    pub metadata: HashMap<String, String>,
    /// The tensors whose names start with the prefix asked for, flattened.
    pub extra: Vec<(String, HostData)>,
}

/// Loads a model and, besides its weights, every tensor named
/// `extra_prefix…` (any other tensor is an error).
pub fn from_bytes_with_extra<B: Backend>(
    bytes: &[u8],
    backend: &B,
    extra_prefix: &str,
) -> Result<LoadedWithExtra<B>> {
    // The safetensors framing first, for errors that say what is wrong.
    let Some(head) = bytes.get(..8) else {
        return Err(Error::invalid(format!(
            "not a kiln model file, or truncated: {} bytes, not even a safetensors header length",
            bytes.len()
        )));
    };
    let header_len = u64::from_le_bytes(head.try_into().expect("8 bytes"));
    if header_len > (bytes.len() - 8) as u64 {
        return Err(Error::invalid(format!(
            "not a kiln model file, or truncated: its header claims {header_len} bytes, the file holds {}",
            bytes.len()
        )));
    }
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| match e {
        safetensors::SafeTensorError::MetadataIncompleteBuffer => Error::invalid(format!(
            "truncated (or with trailing bytes): {} bytes of tensor data after the header do not match its offsets",
            bytes.len() as u64 - 8 - header_len
        )),
        e => Error::invalid(format!("not a kiln model file (safetensors: {e})")),
    })?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let spec_json = metadata.get(SPEC_KEY).ok_or_else(|| {
        Error::invalid(format!(
            "no `{SPEC_KEY}` metadata: this safetensors file was not written by kiln"
        ))
    })?;
    let spec = ModelSpec::from_json(spec_json)?;
    // Check the spec against the file before building (allocating) the model.
    let (_, params) = spec.plan()?;
    if params.saturating_mul(4) > bytes.len() {
        return Err(Error::invalid(format!(
            "model `{}` needs {params} f32 parameters but the file holds only {} bytes",
            spec.name,
            bytes.len()
        )));
    }
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| Error::invalid(format!("corrupt model file: {e}")))?;
    let seed = match metadata.get(MODEL_SEED_KEY) {
        Some(s) => s
            .parse()
            .map_err(|_| Error::invalid(format!("`{MODEL_SEED_KEY}` is `{s}`, not a seed")))?,
        None => 0,
    };
    // Every tensor's bytes as written (files from before checksums were
    // kept have none to check), and finite values throughout.
    let sums: Option<HashMap<String, String>> = metadata
        .get(CHECKSUMS_KEY)
        .map(|j| {
            serde_json::from_str(j).map_err(|e| {
                Error::invalid(format!("`{CHECKSUMS_KEY}` metadata does not parse: {e}"))
            })
        })
        .transpose()?;
    for (name, view) in st.tensors() {
        if let Some(sums) = &sums {
            let want = sums.get(&name).ok_or_else(|| {
                Error::invalid(format!(
                    "tensor `{name}` has no checksum: the file was altered after it was written"
                ))
            })?;
            let got = checksum(view.data());
            if &got != want {
                return Err(Error::invalid(format!(
                    "tensor `{name}` is corrupted: its data's checksum is {got}, the file recorded {want}"
                )));
            }
        }
        if view.dtype() == safetensors::Dtype::F32 {
            let bad = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .enumerate()
                .find(|(_, v)| !v.is_finite());
            if let Some((i, v)) = bad {
                return Err(Error::invalid(format!(
                    "tensor `{name}` holds {v} at element {i}: refusing a model with non-finite weights"
                )));
            }
        }
    }
    let mut model = Sequential::from_spec(&spec, seed, backend)?;
    let names: Vec<String> = model.named_params().into_iter().map(|(n, _)| n).collect();
    let mut extra = Vec::new();
    for (name, view) in st.tensors() {
        if names.contains(&name) {
            continue;
        }
        if !name.starts_with(extra_prefix) {
            return Err(Error::invalid(format!(
                "unexpected tensor `{name}`: model `{}` has {} parameters ({})",
                spec.name,
                names.len(),
                names.join(", ")
            )));
        }
        let dtype = match view.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            other => {
                return Err(Error::invalid(format!(
                    "tensor `{name}` is {other:?}, not f32"
                )))
            }
        };
        extra.push((name, HostData::from_bytes(dtype, view.data())?));
    }
    for (name, p) in names.iter().zip(model.params_mut()) {
        let view = st
            .tensor(name)
            .map_err(|_| Error::invalid(format!("missing tensor `{name}`")))?;
        if view.shape() != p.shape().dims() || view.dtype() != safetensors::Dtype::F32 {
            return Err(Error::invalid(format!(
                "tensor `{name}` is {:?} {:?}, the model needs {} f32",
                view.shape(),
                view.dtype(),
                p.shape()
            )));
        }
        let data = HostData::from_bytes(DType::F32, view.data())?;
        let shape = Shape::new(view.shape())?;
        let t = Tensor::from_storage(
            Arc::new(backend.upload(&data)?),
            Layout::contiguous(shape),
            backend,
        )?;
        p.set(&t)?;
    }
    Ok(LoadedWithExtra {
        model,
        metadata,
        extra,
    })
}
