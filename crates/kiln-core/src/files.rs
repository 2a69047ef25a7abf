//! Reading the files kiln loads whole — models, checkpoints, datasets,
//! specs, histories — without being led into reading forever.
//!
//! `std::fs::read` of a device such as `/dev/zero` or `/dev/urandom`, or
//! of a pipe nobody closes, never ends, and grows its buffer until memory
//! runs out. These functions read regular files only, whose size is known
//! before the first byte, and say what to give instead.
//!
//! ```
//! use kiln_core::files;
//!
//! let dir = std::env::temp_dir().join(format!("kiln-files-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! std::fs::write(dir.join("a.txt"), "hello")?;
//! assert_eq!(files::read(&dir.join("a.txt"), "text")?, b"hello");
//! // A folder (or a device, a pipe) is refused with a message that says so.
//! let e = files::read(&dir, "model file").unwrap_err().to_string();
//! assert!(e.contains("model file") && e.contains("not a regular file"), "{e}");
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::io::Read;
use std::path::Path;

use crate::{Error, Result};

/// The bytes of the regular file at `path`; anything else (a folder, a
/// device, a pipe, a socket) is an error that names it. `what` says what
/// the file is for the messages ("model file", "checkpoint").
pub fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
    let (file, len) = open(path, what)?;
    // The size read at opening bounds the read: a file that grows while it
    // is read (a log being written) yields what it held then.
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.take(len)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(format!("reading {what} {}", path.display()), e))?;
    Ok(bytes)
}

/// [`read`] as UTF-8 text; invalid UTF-8 is an error that names the file
/// and the byte where it goes wrong.
pub fn read_to_string(path: &Path, what: &str) -> Result<String> {
    String::from_utf8(read(path, what)?).map_err(|e| {
        Error::invalid(format!(
            "{what} {}: not UTF-8 text (invalid byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        ))
    })
}

/// The file at `path`, opened, and its length, if it is a regular file.
fn open(path: &Path, what: &str) -> Result<(std::fs::File, u64)> {
    let file = std::fs::File::open(path)
        .map_err(|e| Error::io(format!("reading {what} {}", path.display()), e))?;
    let meta = file
        .metadata()
        .map_err(|e| Error::io(format!("reading {what} {}", path.display()), e))?;
    if !meta.is_file() {
        let kind = if meta.is_dir() {
            "a folder"
        } else {
            "a device, a pipe or a socket"
        };
        return Err(Error::invalid(format!(
            "{what} {}: not a regular file ({kind}); give the path of a file",
            path.display()
        )));
    }
    Ok((file, meta.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_and_folders_are_refused_without_reading_them() {
        for path in ["/dev/zero", "/dev/urandom", "/dev/null"] {
            let p = Path::new(path);
            if p.exists() {
                let e = read(p, "model file").unwrap_err().to_string();
                assert!(e.contains("not a regular file") && e.contains(path), "{e}");
            }
        }
        let e = read(&std::env::temp_dir(), "checkpoint")
            .unwrap_err()
            .to_string();
        assert!(e.contains("a folder"), "{e}");
        let e = read(Path::new("/no/such/file"), "history")
            .unwrap_err()
            .to_string();
        assert!(e.contains("reading history /no/such/file"), "{e}");
    }

    #[test]
    fn text_that_is_not_utf8_names_the_offset() {
        let path = std::env::temp_dir().join(format!("kiln-files-{}", std::process::id()));
        std::fs::write(&path, b"ab\xffc").unwrap();
        let e = read_to_string(&path, "text").unwrap_err().to_string();
        std::fs::remove_file(&path).unwrap();
        assert!(e.contains("not UTF-8") && e.contains("offset 2"), "{e}");
    }
}
