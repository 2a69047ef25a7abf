//! `include/kiln.h` is what cbindgen generates from the crate today: a
//! change to the ABI without a regenerated header fails here.
//! `KILN_BLESS=1 cargo test -p kiln-capi --test header` rewrites it.

use std::path::Path;

#[test]
fn the_committed_header_is_what_cbindgen_generates() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let bindings = cbindgen::generate_with_config(dir, config).expect("cbindgen runs");
    let mut generated = Vec::new();
    bindings.write(&mut generated);
    let generated = String::from_utf8(generated).expect("the header is UTF-8");
    let path = dir.join("include/kiln.h");
    if std::env::var_os("KILN_BLESS").is_some() {
        std::fs::write(&path, &generated).expect("writing include/kiln.h");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "crates/kiln-capi/include/kiln.h is stale: regenerate it with \
         `KILN_BLESS=1 cargo test -p kiln-capi --test header` and commit it"
    );
}
