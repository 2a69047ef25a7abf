//! `examples/c/train_and_predict.c` compiled by the system C compiler
//! against this crate's static library and run: it trains, evaluates,
//! saves, loads and predicts through the C ABI, and checks that bad calls
//! come back as errors. Then the same program under Valgrind's memcheck,
//! which must report no invalid access and no leak (`KILN_REQUIRE_VALGRIND=1`
//! makes a missing `valgrind` a failure instead of a skip).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace's root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The static library cargo built beside this test's binary.
fn static_lib() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's path");
    let lib = exe.with_file_name("libkiln_capi.a");
    assert!(lib.exists(), "{} was not built", lib.display());
    lib
}

/// Compiles the C example into `dir`.
fn compile(dir: &Path) -> PathBuf {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = dir.join("train_and_predict");
    let status = Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-O1", "-g"])
        .arg(root().join("examples/c/train_and_predict.c"))
        .arg("-I")
        .arg(root().join("crates/kiln-capi/include"))
        .arg(static_lib())
        .args(["-lpthread", "-ldl", "-lm", "-o"])
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("running the C compiler `{cc}`: {e}"));
    assert!(status.success(), "the C example did not compile");
    out
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("running the C example");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "the C example failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    format!("{stdout}{stderr}")
}

#[test]
fn the_c_example_trains_predicts_and_refuses_bad_calls() {
    let dir = tempfile::tempdir().unwrap();
    let exe = compile(dir.path());
    let out = run(Command::new(&exe)
        .arg(root().join("data/mnist-sample"))
        .args(["2", "1"])
        .current_dir(dir.path()));
    assert!(out.trim_end().ends_with("ok"), "{out}");
    assert_eq!(out.matches("refused as expected").count(), 9, "{out}");

    if Command::new("valgrind").arg("--version").output().is_err() {
        assert!(
            std::env::var_os("KILN_REQUIRE_VALGRIND").is_none(),
            "KILN_REQUIRE_VALGRIND is set but valgrind is not installed (apt-get install valgrind)"
        );
        eprintln!("skipped the Valgrind run: valgrind is not installed");
        return;
    }
    // One thread: Valgrind runs one at a time, and a helper's spinning
    // would only slow it down. (Valgrind hides AVX-512, so the AVX2 kernels run.)
    let out = run(Command::new("valgrind")
        .args([
            "--error-exitcode=99",
            "--leak-check=full",
            "--errors-for-leak-kinds=definite,indirect",
            "--show-leak-kinds=definite,indirect",
        ])
        .arg(&exe)
        .arg(root().join("data/mnist-sample"))
        .args(["1", "1"])
        .current_dir(dir.path()));
    assert!(out.contains("ERROR SUMMARY: 0 errors"), "{out}");
    assert!(
        out.contains("definitely lost: 0 bytes") || out.contains("no leaks are possible"),
        "{out}"
    );
}
