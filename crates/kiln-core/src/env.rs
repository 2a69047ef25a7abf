//! Settings read from the environment (`KILN_THREADS`, `KILN_CPU`,
//! `KILN_LOG`, …), read the same way everywhere: a variable that is unset
//! or blank is not set, and one that is not UTF-8 is an error that names
//! it.
//!
//! ```
//! // A name no one sets.
//! assert_eq!(kiln_core::env::setting("KILN_DOC_EXAMPLE_UNSET")?, None);
//! # Ok::<(), kiln_core::Error>(())
//! ```

use crate::{Error, Result};

/// The value of the environment variable `name`, trimmed; `None` when it
/// is unset or holds only white space.
pub fn setting(name: &str) -> Result<Option<String>> {
    match std::env::var(name) {
        Ok(v) if v.trim().is_empty() => Ok(None),
        Ok(v) => Ok(Some(v.trim().to_string())),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(v)) => Err(Error::invalid(format!(
            "{name}={v:?} is not UTF-8 text: unset it or give one of the values it documents"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blank_is_unset_and_values_are_trimmed() {
        // Names of this test's own; no other test reads them.
        std::env::set_var("KILN_ENV_TEST_BLANK", "  ");
        std::env::set_var("KILN_ENV_TEST_VALUE", " 4 ");
        assert_eq!(setting("KILN_ENV_TEST_BLANK").unwrap(), None);
        assert_eq!(
            setting("KILN_ENV_TEST_VALUE").unwrap().as_deref(),
            Some("4")
        );
        assert_eq!(setting("KILN_ENV_TEST_NEVER_SET").unwrap(), None);
    }

    #[cfg(unix)]
    #[test]
    fn a_value_that_is_not_utf8_is_named() {
        use std::os::unix::ffi::OsStrExt;
        std::env::set_var(
            "KILN_ENV_TEST_BYTES",
            std::ffi::OsStr::from_bytes(&[0x66, 0xff]),
        );
        let e = setting("KILN_ENV_TEST_BYTES").unwrap_err().to_string();
        assert!(
            e.contains("KILN_ENV_TEST_BYTES") && e.contains("not UTF-8"),
            "{e}"
        );
    }
}
