//! Each planted fault is caught by the check that covers it, at default
//! settings — through the library (`run_check`) and through the vendor's
//! own command line, whose printed reproduction line reruns the failure
//! exactly as printed.

use std::process::Command;

use kiln_conformance::{run_check, Config, Status};
use kiln_core::DType;
use kiln_vendor_example::{Fault, PretendDevice};

#[test]
fn every_fault_fails_its_check_and_the_clean_device_passes() {
    let clean = PretendDevice::new().unwrap();
    for (fault, name, op) in Fault::ALL {
        let cfg = Config::new("device");
        let r = run_check(&clean, op, DType::F32, &cfg);
        assert_eq!(r.status, Status::Pass, "clean {op}: {:?}", r.failure);
        let faulty = PretendDevice::with_fault(fault).unwrap();
        let r = run_check(&faulty, op, DType::F32, &cfg);
        assert_eq!(r.status, Status::Fail, "{name} not caught by {op}");
        eprintln!("{name}: {}", r.failure.unwrap().lines().next().unwrap());
    }
}

#[test]
fn declared_unsupported_checks_are_skipped_and_the_fallback_runs_them() {
    let device = PretendDevice::new().unwrap();
    let cfg = Config::new("device");
    let r = run_check(&device, "conv2d", DType::F16, &cfg);
    assert_eq!(r.status, Status::Unsupported);
    assert_eq!(r.cases, 0);
    let r = run_check(&device.with_fallback(), "conv2d", DType::F16, &cfg);
    assert_eq!(r.status, Status::Pass, "{:?}", r.failure);
    assert!(r.cases > 0);
}

fn pretend_device(args: &[&str], fault: Option<&str>) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pretend-device"));
    cmd.args(args).env_remove("PRETEND_FAULT");
    for var in [
        "KILN_CONFORMANCE_CASES",
        "KILN_CONFORMANCE_TIER",
        "KILN_CONFORMANCE_SEED",
    ] {
        cmd.env_remove(var);
    }
    if let Some(f) = fault {
        cmd.env("PRETEND_FAULT", f);
    }
    cmd.output().expect("pretend-device runs")
}

#[test]
fn the_command_line_fails_naming_the_op_and_its_reproduction_line_reruns_it() {
    let clean = pretend_device(&["conformance", "--op", "softmax", "--dtype", "f32"], None);
    let out = String::from_utf8_lossy(&clean.stdout);
    assert!(clean.status.success(), "{out}");
    assert!(out.contains("backend device (pretend)"), "{out}");

    let failed = pretend_device(
        &["conformance", "--op", "gemm", "--dtype", "f32"],
        Some("gemm-deep-k"),
    );
    let out = String::from_utf8_lossy(&failed.stdout);
    let err = String::from_utf8_lossy(&failed.stderr);
    assert!(!failed.status.success(), "{out}");
    assert!(err.contains("conformance checks failed"), "{err}");
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("reproduce: "))
        .unwrap_or_else(|| panic!("no reproduction line in\n{out}"));
    assert!(
        line.contains("--op gemm --dtype f32 --tier blocked"),
        "{line}"
    );

    // Exactly as printed, through a shell, with the fault still planted.
    let rerun = Command::new("sh")
        .arg("-c")
        .arg(line)
        .env("PRETEND_FAULT", "gemm-deep-k")
        .output()
        .unwrap();
    let again = String::from_utf8_lossy(&rerun.stdout);
    assert!(!rerun.status.success(), "{again}");
    assert!(again.contains("gemm") && again.contains("FAIL"), "{again}");
    let first_failure = |s: &str| {
        s.lines()
            .find(|l| l.contains("[blocked tier]"))
            .map(str::to_string)
    };
    assert_eq!(
        first_failure(&out),
        first_failure(&again),
        "the rerun found another case"
    );
}

#[test]
fn an_unknown_fault_name_is_a_clear_error() {
    let out = pretend_device(&["conformance", "--op", "gemm"], Some("bogus"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("PRETEND_FAULT=bogus: expected one of"),
        "{err}"
    );
}

#[test]
fn the_vendor_binary_trains_and_writes_a_report() {
    let dir = std::env::temp_dir().join(format!("pretend-device-{}", std::process::id()));
    let runs = dir.join("mlp");
    let o = pretend_device(
        &[
            "train",
            "--model",
            "mlp",
            "--epochs",
            "1",
            "--limit",
            "1000",
            "--plain",
            "--out",
            runs.to_str().unwrap(),
        ],
        None,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(runs.join("model.safetensors").exists());

    let out = dir.join("report");
    let o = pretend_device(
        &[
            "report",
            "--tier",
            "edge",
            "--cases",
            "4",
            "--quick",
            "--out",
            out.to_str().unwrap(),
        ],
        None,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("# kiln report: device (pretend)"), "{md}");
    assert!(
        md.contains("| conv2d | pass") && md.contains("| unsupported |"),
        "{md}"
    );
    assert!(md.contains("the device's best GEMM"), "{md}");
    let _ = std::fs::remove_dir_all(&dir);
}
