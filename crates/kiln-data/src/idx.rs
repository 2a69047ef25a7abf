//! The IDX format (LeCun's MNIST files): a 4-byte magic `00 00 type ndim`,
//! `ndim` big-endian u32 extents, then the data, row-major. Files may be
//! gzip-compressed.
//!
//! Only type `0x08` (unsigned byte) is supported; every other defect —
//! truncation, bad magic, zero or absurd dimensions, trailing bytes — is its
//! own [`DataError`].
//!
//! ```
//! use kiln_data::parse_idx;
//!
//! // An IDX file: magic (0, 0, type 0x08 = u8, 2 dimensions), the extents, the bytes.
//! let mut file = vec![0, 0, 0x08, 2, 0, 0, 0, 2, 0, 0, 0, 3];
//! file.extend_from_slice(&[1, 2, 3, 4, 5, 6]);
//! let a = parse_idx(&file)?;
//! assert_eq!((a.dims.as_slice(), a.data.as_slice()), (&[2, 3][..], &[1, 2, 3, 4, 5, 6][..]));
//! // A truncated file is an error that says so.
//! assert!(parse_idx(&file[..15]).is_err());
//! # Ok::<(), kiln_core::DataError>(())
//! ```

use std::io::Read;
use std::path::Path;

use kiln_core::{DataError, Error, Result};

/// The most bytes a (decompressed) IDX file may hold: far above any real
/// dataset, low enough that a gzip bomb cannot exhaust memory.
pub const MAX_IDX_BYTES: u64 = 4 << 30;

/// The most bytes one byte of deflate data decompresses to (a run of 258
/// bytes per 2-bit code, ≈ 1032:1).
const DEFLATE_MAX_RATIO: u64 = 1032;

/// A decoded IDX array of unsigned bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdxArray {
    /// Extents, outermost first.
    pub dims: Vec<usize>,
    /// The elements, row-major.
    pub data: Vec<u8>,
}

/// What an IDX header declares.
struct Header {
    dims: Vec<usize>,
    /// Bytes of the header (magic and extents).
    len: u64,
    /// Elements the extents declare.
    count: u64,
}

/// Checks the header at the start of `bytes` (the whole file or at least
/// its header): magic, type, extents and their product.
fn parse_header(bytes: &[u8]) -> std::result::Result<Header, DataError> {
    let found = bytes.len() as u64;
    if bytes.len() < 4 {
        return Err(DataError::Truncated { expected: 4, found });
    }
    let magic = [bytes[0], bytes[1], bytes[2], bytes[3]];
    if magic[0] != 0 || magic[1] != 0 || magic[3] == 0 {
        return Err(DataError::BadMagic { found: magic });
    }
    match magic[2] {
        0x08 => {}
        // 0x09 i8, 0x0B i16, 0x0C i32, 0x0D f32, 0x0E f64: valid IDX, not ours.
        code @ (0x09 | 0x0B | 0x0C | 0x0D | 0x0E) => {
            return Err(DataError::UnsupportedType { code })
        }
        _ => return Err(DataError::BadMagic { found: magic }),
    }
    let ndim = usize::from(magic[3]);
    let len = 4 + 4 * ndim as u64;
    if found < len {
        return Err(DataError::Truncated {
            expected: len,
            found,
        });
    }
    let mut dims = Vec::with_capacity(ndim);
    let mut count: u64 = 1;
    // The product with zero extents counted as 1: bounded too, so that any
    // consumer may multiply the dimensions in any order without overflow.
    let mut nonzero: u64 = 1;
    for i in 0..ndim {
        let b = &bytes[4 + 4 * i..8 + 4 * i];
        let d = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        count = count.saturating_mul(u64::from(d));
        nonzero = nonzero.saturating_mul(u64::from(d.max(1)));
        dims.push(d as usize);
    }
    if len.saturating_add(count) > MAX_IDX_BYTES || nonzero > MAX_IDX_BYTES {
        return Err(DataError::BadDimensions(format!(
            "dimensions {dims:?} declare {count} elements, more than this reader accepts"
        )));
    }
    Ok(Header { dims, len, count })
}

/// The error for `found` bytes where `header` declares its size.
fn check_size(header: &Header, found: u64) -> std::result::Result<(), DataError> {
    let expected = header.len + header.count;
    match found.cmp(&expected) {
        std::cmp::Ordering::Less => Err(DataError::Truncated { expected, found }),
        std::cmp::Ordering::Greater => Err(DataError::TrailingBytes {
            extra: found - expected,
        }),
        std::cmp::Ordering::Equal => Ok(()),
    }
}

/// Decodes an (uncompressed) IDX file held in memory.
pub fn parse_idx(bytes: &[u8]) -> std::result::Result<IdxArray, DataError> {
    let header = parse_header(bytes)?;
    check_size(&header, bytes.len() as u64)?;
    Ok(IdxArray {
        data: bytes[header.len as usize..].to_vec(),
        dims: header.dims,
    })
}

/// Decodes IDX bytes, gzip-compressed or not. A compressed file is read
/// header first, then its data straight into a buffer of the size the
/// header declares: one allocation, no copy (Fashion-MNIST's 47 MB of
/// training images had been decompressed into a buffer grown by doubling,
/// then copied out of it).
pub fn decode(raw: &[u8]) -> std::result::Result<IdxArray, DataError> {
    if !raw.starts_with(&[0x1f, 0x8b]) {
        return parse_idx(raw);
    }
    let gzip = |e: std::io::Error| DataError::Gzip(e.to_string());
    let mut z = flate2::read::MultiGzDecoder::new(raw);
    // The magic, then the extents it announces (at most 255).
    let mut head = vec![0u8; 4];
    let mut got = read_full(&mut z, &mut head).map_err(gzip)?;
    if got == 4 && head[0..2] == [0, 0] {
        head.resize(4 + 4 * usize::from(head[3]), 0);
        got += read_full(&mut z, &mut head[4..]).map_err(gzip)?;
    }
    let header = parse_header(&head[..got])?;
    // Reserved as declared, but never more than the input could inflate to
    // (deflate's ratio is at most 1032:1): a 40-byte file declaring 4 GiB
    // gets a buffer that grows with what actually arrives.
    let reserve = header
        .count
        .min((raw.len() as u64).saturating_mul(DEFLATE_MAX_RATIO));
    let mut data = Vec::with_capacity(usize::try_from(reserve).unwrap_or(0));
    (&mut z)
        .take(header.count)
        .read_to_end(&mut data)
        .map_err(gzip)?;
    // Whatever follows the declared elements counts toward the error,
    // up to the reader's limit.
    let rest = std::io::copy(
        &mut (&mut z).take(MAX_IDX_BYTES - header.count),
        &mut std::io::sink(),
    )
    .map_err(gzip)?;
    let found = header.len + data.len() as u64 + rest;
    if found > MAX_IDX_BYTES {
        return Err(DataError::Gzip("decompresses to more than 4 GiB".into()));
    }
    check_size(&header, found)?;
    Ok(IdxArray {
        dims: header.dims,
        data,
    })
}

/// Reads until `buf` is full or the stream ends; the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Reads and decodes an IDX file, gunzipping it if it starts with the gzip magic.
pub fn read_idx(path: &Path) -> Result<IdxArray> {
    let raw = kiln_core::files::read(path, "IDX file")?;
    decode(&raw).map_err(|source| Error::Data {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 0, 0x08, dims.len() as u8];
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn round_trip() {
        let a = parse_idx(&idx(&[2, 3], &[1, 2, 3, 4, 5, 6])).unwrap();
        assert_eq!(a.dims, vec![2, 3]);
        assert_eq!(a.data, vec![1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn each_defect_has_its_own_error() {
        let good = idx(&[2, 2], &[1, 2, 3, 4]);
        assert!(matches!(
            parse_idx(&good[..good.len() - 1]),
            Err(DataError::Truncated {
                expected: 16,
                found: 15
            })
        ));
        assert!(matches!(
            parse_idx(&good[..6]),
            Err(DataError::Truncated { expected: 12, .. })
        ));
        assert!(matches!(
            parse_idx(&[1, 0, 8, 1, 0, 0, 0, 0]),
            Err(DataError::BadMagic { .. })
        ));
        let mut f32_file = good.clone();
        f32_file[2] = 0x0D;
        assert!(matches!(
            parse_idx(&f32_file),
            Err(DataError::UnsupportedType { code: 0x0D })
        ));
        let mut extra = good.clone();
        extra.push(9);
        assert!(matches!(
            parse_idx(&extra),
            Err(DataError::TrailingBytes { extra: 1 })
        ));
        assert!(matches!(
            parse_idx(&idx(&[u32::MAX, u32::MAX, u32::MAX], &[])),
            Err(DataError::BadDimensions(_))
        ));
        // Zero elements, but dimensions whose product overflows (found by fuzzing).
        assert!(matches!(
            parse_idx(&idx(&[u32::MAX, u32::MAX, u32::MAX, 0], &[])),
            Err(DataError::BadDimensions(_))
        ));
    }

    /// A compressed file, read header first, has the errors of the same
    /// bytes uncompressed.
    #[test]
    fn compressed_files_have_the_uncompressed_errors() {
        use std::io::Write;
        let gz = |bytes: &[u8]| {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(bytes).unwrap();
            e.finish().unwrap()
        };
        let good = idx(&[2, 3], &[1, 2, 3, 4, 5, 6]);
        let mut extra = good.clone();
        extra.extend_from_slice(&[7, 8, 9]);
        let mut f32_file = good.clone();
        f32_file[2] = 0x0D;
        for bytes in [
            good.clone(),
            good[..good.len() - 1].to_vec(),
            good[..6].to_vec(),
            good[..2].to_vec(),
            Vec::new(),
            extra,
            f32_file,
            vec![1, 0, 8, 1, 0, 0, 0, 0],
            idx(&[u32::MAX, u32::MAX, u32::MAX], &[]),
            idx(&[0, 5], &[]),
            // Four GiB declared by a few bytes: refused as truncated
            // without reserving what the header claims.
            idx(&[1 << 16, 1 << 15], &[1, 2, 3]),
        ] {
            assert_eq!(
                format!("{:?}", decode(&gz(&bytes))),
                format!("{:?}", parse_idx(&bytes)),
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn corrupt_gzip_is_an_error() {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&idx(&[3], &[7, 8, 9])).unwrap();
        let gz = e.finish().unwrap();
        assert_eq!(decode(&gz).unwrap().data, vec![7, 8, 9]);
        assert!(matches!(
            decode(&gz[..gz.len() - 6]),
            Err(DataError::Gzip(_))
        ));
    }
}
