//! Training state for `--save-state` / `--resume`: a folder with the adapter in f32
//! (`adapter.safetensors`), the optimizer moments (`optimizer.safetensors`) and
//! `state.json` (position in the run, seed, what was trained on). Random draws are streams
//! named by (seed, purpose, position) (`train::rng`), so position and seed restore them;
//! the data order of an epoch follows from (seed, epoch).
//!
//! Written as a sibling temporary folder, then swapped in by renames, so a kill leaves
//! the previous state or the new one.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const FORMAT: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StateInfo {
    pub format: u32,
    /// `lora` (later: the other methods).
    pub method: String,
    /// Optimizer steps done.
    pub step: u64,
    /// The epoch in progress (0-based) and the micro-batches of it already trained.
    pub epoch: u64,
    pub batch_in_epoch: u64,
    /// Micro-batches done in the whole run.
    pub micro: u64,
    pub seed: u64,
    /// The checkpoint's file name and architecture.
    pub model: String,
    pub arch: String,
    /// The network shape (`dim`, `alpha`, `conv_dim`, `conv_alpha`, parts trained).
    pub network: serde_json::Value,
    pub optimizer: String,
    /// Sum and count of the epoch's losses so far (for `loss/epoch`).
    pub epoch_loss_sum: f64,
    pub epoch_loss_count: u64,
    pub started: u64,
    pub session_id: u64,
}

fn err(p: &Path, e: impl std::fmt::Display) -> String {
    format!("{}: {e}", p.display())
}

/// Write a state folder at `dir` (replacing one that is there).
pub fn save(
    dir: &Path,
    info: &StateInfo,
    adapter: &[(String, Tensor)],
    optimizer: &[(String, Tensor)],
) -> Result<(), String> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    crate::util::atomic::create_dir_all(parent).map_err(|e| e.to_string())?;
    let tmp = tempfile::Builder::new()
        .prefix(crate::util::atomic::TEMP_PREFIX)
        .tempdir_in(parent)
        .map_err(|e| err(parent, e))?;
    let none = BTreeMap::new();
    let write = |name: &str, bytes: &[u8]| -> Result<(), String> {
        let p = tmp.path().join(name);
        std::fs::write(&p, bytes).map_err(|e| err(&p, e))
    };
    // Streamed: a DreamBooth state holds the whole model and its optimizer (GBs).
    for (name, tensors) in [
        ("adapter.safetensors", adapter),
        ("optimizer.safetensors", optimizer),
    ] {
        crate::formats::safetensors::write_streaming(&tmp.path().join(name), tensors, None, &none)?;
    }
    let json = serde_json::to_string_pretty(info).map_err(|e| e.to_string())?;
    write("state.json", json.as_bytes())?;
    for f in ["adapter.safetensors", "optimizer.safetensors", "state.json"] {
        let p = tmp.path().join(f);
        std::fs::File::open(&p)
            .and_then(|f| f.sync_all())
            .map_err(|e| err(&p, e))?;
    }
    let tmp = tmp.keep();
    let old: Option<PathBuf> = if dir.exists() {
        let o = parent.join(format!(
            "{}old-{}",
            crate::util::atomic::TEMP_PREFIX,
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&o);
        std::fs::rename(dir, &o).map_err(|e| err(dir, e))?;
        Some(o)
    } else {
        None
    };
    std::fs::rename(&tmp, dir).map_err(|e| err(dir, e))?;
    if let Some(o) = old {
        let _ = std::fs::remove_dir_all(o);
    }
    Ok(())
}

pub struct Loaded {
    pub info: StateInfo,
    pub adapter: BTreeMap<String, Tensor>,
    pub optimizer: BTreeMap<String, Tensor>,
}

/// Read a state folder written by [`save`].
pub fn load(dir: &Path) -> Result<Loaded, String> {
    let j = dir.join("state.json");
    let text = std::fs::read_to_string(&j)
        .map_err(|e| err(&j, format!("{e} (not a folder written with --save-state?)")))?;
    let info: StateInfo = serde_json::from_str(&text).map_err(|e| err(&j, e))?;
    if info.format != FORMAT {
        return Err(err(
            &j,
            format!("state format {} (this sdkit reads {FORMAT})", info.format),
        ));
    }
    let read = |name: &str| -> Result<BTreeMap<String, Tensor>, String> {
        let p = dir.join(name);
        crate::formats::safetensors::read_with_metadata(&p).map(|(t, _)| t)
    };
    Ok(Loaded {
        info,
        adapter: read("adapter.safetensors")?,
        optimizer: read("optimizer.safetensors")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn info() -> StateInfo {
        StateInfo {
            format: FORMAT,
            method: "lora".into(),
            step: 3,
            epoch: 1,
            batch_in_epoch: 2,
            micro: 5,
            seed: 42,
            model: "m".into(),
            arch: "SD1".into(),
            network: serde_json::json!({"dim": 4}),
            optimizer: "adamw".into(),
            epoch_loss_sum: 0.5,
            epoch_loss_count: 2,
            started: 1,
            session_id: 2,
        }
    }

    #[test]
    fn saves_replaces_and_loads() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("x-state");
        let t = Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        save(&dir, &info(), &[("a".into(), t.clone())], &[]).unwrap();
        let mut i2 = info();
        i2.step = 4;
        save(&dir, &i2, &[("a".into(), t)], &[]).unwrap();
        let l = load(&dir).unwrap();
        assert_eq!(l.info, i2);
        assert_eq!(l.adapter.len(), 1);
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temporary folders left: {names:?}");
    }
}
