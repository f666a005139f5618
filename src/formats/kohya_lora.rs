//! kohya LoRA `.safetensors` files: tensors plus string metadata (`ss_*`, `modelspec.*`),
//! with the hashes kohya puts in the header (`sshs_model_hash`, `sshs_legacy_hash`,
//! sd-scripts `library/train_util.py`: computed over the file as it would be written with
//! only the `ss_*` metadata). Written atomically.

use super::safetensors::serialize;
use candle_core::Tensor;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

/// kohya's `addnet_hash_safetensors` (sha256 of everything after the header) and
/// `addnet_hash_legacy` (first 8 hex of sha256 of 64 KiB at offset 1 MiB).
pub fn addnet_hashes(bytes: &[u8]) -> (String, String) {
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let model = hex(&Sha256::digest(&bytes[(8 + n).min(bytes.len())..]));
    let a = 0x100000.min(bytes.len());
    let b = (0x100000 + 0x10000).min(bytes.len());
    let legacy = hex(&Sha256::digest(&bytes[a..b]))[..8].to_string();
    (model, legacy)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Write a LoRA file: `metadata` plus the two `sshs_*` hashes, atomically.
pub fn save(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<(), String> {
    let ss: BTreeMap<String, String> = metadata
        .iter()
        .filter(|(k, _)| k.starts_with("ss_"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let (model, legacy) = addnet_hashes(&serialize(tensors, &ss)?);
    let mut meta = metadata.clone();
    meta.insert("sshs_model_hash".into(), model);
    meta.insert("sshs_legacy_hash".into(), legacy);
    let bytes = serialize(tensors, &meta)?;
    crate::util::atomic::write_atomic(path, &bytes)
        .map_err(|e| format!("{}: cannot write: {e}", path.display()))
}
