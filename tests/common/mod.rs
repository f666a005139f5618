//! Shared test helpers: the one relative-error measure the reference-parity tests use,
//! the check that prints how much of its tolerance each comparison used, and the
//! gzipped fixtures of tests/fixtures/gen_checkpoint_fixtures.py unpacked once
//! per test binary.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// tests/fixtures/checkpoint unpacked (`*.gz` gunzipped) into a temp dir that lives for
/// the whole test binary.
pub fn checkpoints() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/checkpoint");
        let dst = tempfile::tempdir().unwrap();
        for entry in walkdir::WalkDir::new(&src) {
            let entry = entry.unwrap();
            if !entry.file_type().is_file() {
                continue;
            }
            let rel = entry.path().strip_prefix(&src).unwrap();
            let mut out = dst.path().join(rel);
            std::fs::create_dir_all(out.parent().unwrap()).unwrap();
            if rel.extension().is_some_and(|e| e == "gz") {
                out.set_extension("");
                let mut gz =
                    flate2::read::GzDecoder::new(std::fs::File::open(entry.path()).unwrap());
                let mut f = std::fs::File::create(&out).unwrap();
                std::io::copy(&mut gz, &mut f).unwrap();
            } else {
                std::fs::copy(entry.path(), &out).unwrap();
            }
        }
        dst
    })
    .path()
}

/// max |a - b| / max(max |b|, floor), computed in f32: one relative error for a whole
/// tensor (the floor keeps near-zero references from inflating it).
pub fn rel_err(a: &candle_core::Tensor, b: &candle_core::Tensor, floor: f32) -> f32 {
    use candle_core::{DType, Tensor};
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    let max = |t: &Tensor| {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    max(&(&a - &b).unwrap()) / max(&b).max(floor)
}

/// max |a - b| over two tensors of the same shape, in f32.
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    use candle_core::DType;
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    (&a - &b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Asserts `err < tol` and prints the error and the margin left (`tol / err`), so the
/// output of a run (`--nocapture`) shows how close each parity check came on this CPU.
pub fn within(err: f64, tol: f64, what: &str) {
    if err == 0.0 {
        eprintln!("{what}: exact (tolerance {tol:.0e})");
    } else {
        let margin = tol / err;
        eprintln!("{what}: error {err:.2e} (tolerance {tol:.0e}, margin {margin:.1}x)");
    }
    assert!(err < tol, "{what}: error {err:e}, tolerance {tol:e}");
}

/// The device reference tests run on: `SDKIT_TEST_DEVICE=cuda` (a `--features cuda`
/// build on a machine with a GPU, see scripts/gpu-check.sh), CPU otherwise.
pub fn device() -> candle_core::Device {
    match std::env::var("SDKIT_TEST_DEVICE").as_deref() {
        Ok("cuda") => {
            candle_core::Device::new_cuda(0).expect("SDKIT_TEST_DEVICE=cuda: no CUDA device")
        }
        _ => candle_core::Device::Cpu,
    }
}

/// `--device` for the CLI under test (`cpu` unless SDKIT_TEST_DEVICE says otherwise).
pub fn device_arg() -> String {
    std::env::var("SDKIT_TEST_DEVICE").unwrap_or_else(|_| "cpu".into())
}

/// A Python with torch: $REFPY (../shared/scripts/refenv.sh), else python3 if it has torch.
pub fn python_with_torch() -> Option<String> {
    let candidates = std::env::var("REFPY")
        .into_iter()
        .chain(["python3".to_string()]);
    candidates.into_iter().find(|p| {
        std::process::Command::new(p)
            .args(["-c", "import torch"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}
