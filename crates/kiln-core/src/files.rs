//! Reading the files kiln loads whole — models, checkpoints, datasets,
//! specs, histories — without being led into reading forever.
//!
//! `std::fs::read` of a device such as `/dev/zero` or `/dev/urandom` never
//! ends, and grows its buffer until memory runs out. These functions read
//! a regular file's bytes up to the size it had when opened, and anything
//! else that is not a folder — a pipe (`<(zcat corpus.gz)`, a token from
//! `<(pass show kiln)`), a device — up to [`STREAM_MAX`] bytes, past which
//! they stop with an error that says to give a file. (Opening a named pipe
//! no program writes to waits for one, as it does for every reader.)
//!
//! ```
//! use kiln_core::files;
//!
//! let dir = std::env::temp_dir().join(format!("kiln-files-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! std::fs::write(dir.join("a.txt"), "hello")?;
//! assert_eq!(files::read(&dir.join("a.txt"), "text")?, b"hello");
//! // A folder is refused with a message that says so.
//! let e = files::read(&dir, "model file").unwrap_err().to_string();
//! assert!(e.contains("model file") && e.contains("a folder"), "{e}");
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::io::Read;
use std::path::Path;

use crate::{Error, Result};

/// The most bytes read from an input that is not a regular file (a pipe,
/// a device): 256 MiB.
pub const STREAM_MAX: u64 = 256 << 20;

/// The bytes of the file at `path`: a regular file's (as large as it was
/// when opened), or up to [`STREAM_MAX`] of a pipe's or device's; a folder,
/// or a stream longer than that, is an error that names it. `what` says
/// what the file is for the messages ("model file", "checkpoint").
pub fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
    let io = |e| Error::io(format!("reading {what} {}", path.display()), e);
    // Looked at before opening: a folder is refused without a handle.
    if std::fs::metadata(path).map_err(io)?.is_dir() {
        return Err(Error::invalid(format!(
            "{what} {}: a folder; give the path of a file",
            path.display()
        )));
    }
    let file = std::fs::File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    // What the file was when opened decides (a path swapped in between is
    // read as what it now is).
    let (limit, regular) = if meta.is_file() {
        (meta.len(), true)
    } else {
        (STREAM_MAX + 1, false)
    };
    let mut bytes = Vec::with_capacity(if regular {
        usize::try_from(limit).unwrap_or(0)
    } else {
        0
    });
    file.take(limit).read_to_end(&mut bytes).map_err(io)?;
    if !regular && bytes.len() as u64 > STREAM_MAX {
        return Err(Error::invalid(format!(
            "{what} {}: more than {} MiB from a pipe or device (is it endless?); give a regular file",
            path.display(),
            STREAM_MAX >> 20
        )));
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endless_devices_and_folders_are_refused_and_pipes_read() {
        // An endless device: read to the cap, then refused.
        let e = read(Path::new("/dev/zero"), "model file")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model file /dev/zero") && e.contains("more than 256 MiB"),
            "{e}"
        );
        // An empty device is empty.
        assert_eq!(read(Path::new("/dev/null"), "text").unwrap(), b"");
        let e = read(&std::env::temp_dir(), "checkpoint")
            .unwrap_err()
            .to_string();
        assert!(e.contains("a folder"), "{e}");
        let e = read(Path::new("/no/such/file"), "history")
            .unwrap_err()
            .to_string();
        assert!(e.contains("reading history /no/such/file"), "{e}");
        // A named pipe with a writer, as `<(command)` gives: read to its end.
        let fifo = std::env::temp_dir().join(format!("kiln-files-fifo-{}", std::process::id()));
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if made.is_ok_and(|s| s.success()) {
            let path = fifo.clone();
            let writer = std::thread::spawn(move || std::fs::write(path, b"a token from a pipe"));
            assert_eq!(read(&fifo, "token file").unwrap(), b"a token from a pipe");
            writer.join().unwrap().unwrap();
            std::fs::remove_file(&fifo).unwrap();
        }
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
