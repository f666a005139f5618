//! Reading `.safetensors` files one tensor at a time.
//!
//! `candle_core::safetensors::load` reads the whole file into memory and then converts every
//! tensor, so loading a 3.4 GB f32 SD1.5 UNet peaked at twice its size. Here the JSON header
//! is parsed first and each tensor's bytes are read, converted and dropped in turn: the peak
//! is the tensors plus one tensor's bytes.

use candle_core::safetensors::Load;
use candle_core::{Device, Tensor};
use safetensors::tensor::{TensorInfo, TensorView};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

/// Header size limit (the safetensors reference implementation uses 100 MB).
const MAX_HEADER: u64 = 100_000_000;

/// Every tensor of a safetensors file on the CPU, in its stored dtype. Errors are one line
/// naming the reason (the caller adds the file name).
pub fn read_all(path: &Path) -> Result<HashMap<String, Tensor>, String> {
    let file = File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let file_len = file.metadata().map_err(|e| e.to_string())?.len();
    let mut r = BufReader::new(file);
    let (n, header) = read_header(&mut r, file_len)?;
    let data_start = 8 + n;
    let data_len = file_len - data_start;

    // Read in file order, so the reads are sequential.
    let mut infos: Vec<(String, TensorInfo)> = header
        .into_iter()
        .filter(|(k, _)| k != "__metadata__")
        .map(|(k, v)| {
            serde_json::from_value::<TensorInfo>(v)
                .map(|i| (k.clone(), i))
                .map_err(|e| format!("tensor `{k}`: bad header entry: {e}"))
        })
        .collect::<Result<_, _>>()?;
    infos.sort_by_key(|(_, i)| i.data_offsets.0);

    let mut out = HashMap::with_capacity(infos.len());
    let mut buf = Vec::new();
    for (name, info) in infos {
        let (a, b) = info.data_offsets;
        let need = info
            .shape
            .iter()
            .try_fold(info.dtype.bitsize(), |acc, &d| acc.checked_mul(d))
            .map(|bits| bits.div_ceil(8));
        if b < a || b as u64 > data_len || need != Some(b - a) {
            return Err(format!(
                "tensor `{name}`: data offsets {a}..{b} do not match its shape {:?} / {:?} \
                 or the file size (truncated download?)",
                info.shape, info.dtype
            ));
        }
        buf.resize(b - a, 0);
        r.seek(SeekFrom::Start(data_start + a as u64))
            .and_then(|_| r.read_exact(&mut buf))
            .map_err(|e| format!("tensor `{name}`: cannot read its data: {e}"))?;
        let view = TensorView::new(info.dtype, info.shape, &buf)
            .map_err(|e| format!("tensor `{name}`: {e}"))?;
        let t = view
            .load(&Device::Cpu)
            .map_err(|e| format!("tensor `{name}`: {e}"))?;
        out.insert(name, t);
    }
    Ok(out)
}

/// Write `tensors` (each converted to `dtype` when given) with string `metadata` to
/// `path`, atomically and one tensor at a time: the peak is the tensors plus one
/// converted copy, not the whole file in memory (a 4 GB checkpoint, a training state).
pub fn write_streaming(
    path: &Path,
    tensors: &[(String, Tensor)],
    dtype: Option<candle_core::DType>,
    metadata: &std::collections::BTreeMap<String, String>,
) -> Result<(), String> {
    use safetensors::View;
    let fail = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let mut order: Vec<&(String, Tensor)> = tensors.iter().collect();
    order.sort_by(|a, b| a.0.cmp(&b.0));
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::json!(metadata));
    }
    let mut offset = 0usize;
    for (name, t) in &order {
        let dt = dtype.unwrap_or(t.dtype());
        let len = t.elem_count() * dt.size_in_bytes();
        let st_dtype = match dt {
            candle_core::DType::F32 => "F32",
            candle_core::DType::F16 => "F16",
            candle_core::DType::BF16 => "BF16",
            candle_core::DType::F64 => "F64",
            candle_core::DType::I64 => "I64",
            candle_core::DType::U8 => "U8",
            candle_core::DType::U32 => "U32",
            other => return Err(fail(&format!("cannot write {other:?} tensors"))),
        };
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": st_dtype, "shape": t.dims(), "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    let mut head = serde_json::to_vec(&header).map_err(|e| fail(&e))?;
    head.resize(head.len().div_ceil(8) * 8, b' ');
    crate::util::atomic::write_atomic_with(path, |w| {
        w.write_all(&(head.len() as u64).to_le_bytes())?;
        w.write_all(&head)?;
        for (_, t) in &order {
            let t = match dtype {
                Some(d) if d != t.dtype() => t.to_dtype(d).map_err(std::io::Error::other)?,
                _ => t.clone(),
            };
            let t = t.to_device(&Device::Cpu).map_err(std::io::Error::other)?;
            w.write_all(&t.data())?;
        }
        Ok(())
    })
    .map_err(|e| fail(&e))
}

/// safetensors bytes of `tensors` with string `metadata` (tensor order as the format lays
/// it out, so equal tensors give equal data bytes).
pub fn serialize(
    tensors: &[(String, Tensor)],
    metadata: &std::collections::BTreeMap<String, String>,
) -> Result<Vec<u8>, String> {
    let meta: HashMap<String, String> = metadata.clone().into_iter().collect();
    let meta = (!meta.is_empty()).then_some(meta);
    safetensors::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), meta)
        .map_err(|e| format!("cannot serialize tensors: {e}"))
}

/// Every tensor of a (small) safetensors file on the CPU, and its string metadata; errors
/// name the file.
pub fn read_with_metadata(
    path: &Path,
) -> Result<
    (
        std::collections::BTreeMap<String, Tensor>,
        std::collections::BTreeMap<String, String>,
    ),
    String,
> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| format!("{}: not a safetensors file: {e}", path.display()))?;
    let metadata = meta
        .metadata()
        .clone()
        .map(|m| m.into_iter().collect())
        .unwrap_or_default();
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .into_iter()
        .collect();
    Ok((tensors, metadata))
}

/// The JSON header of a safetensors stream positioned at its start: its length and its
/// entries (`__metadata__` included).
fn read_header(
    r: &mut impl Read,
    file_len: u64,
) -> Result<(u64, HashMap<String, serde_json::Value>), String> {
    let mut n = [0u8; 8];
    r.read_exact(&mut n)
        .map_err(|_| "not a safetensors file: shorter than its header length".to_string())?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER || n + 8 > file_len {
        return Err(format!(
            "not a safetensors file: header length {n} does not fit a {file_len}-byte file"
        ));
    }
    let mut header = vec![0u8; n as usize];
    r.read_exact(&mut header).map_err(|e| e.to_string())?;
    let header = serde_json::from_slice(&header)
        .map_err(|e| format!("not a safetensors file: bad header: {e}"))?;
    Ok((n, header))
}

/// Name and shape of every tensor of a safetensors file, from its header alone (nothing
/// else is read). Errors are one line naming the reason.
pub fn shapes(path: &Path) -> Result<Vec<(String, Vec<usize>)>, String> {
    let file = File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let file_len = file.metadata().map_err(|e| e.to_string())?.len();
    let (_, header) = read_header(&mut BufReader::new(file), file_len)?;
    header
        .into_iter()
        .filter(|(k, _)| k != "__metadata__")
        .map(|(k, v)| {
            serde_json::from_value::<TensorInfo>(v)
                .map(|i| (k.clone(), i.shape))
                .map_err(|e| format!("tensor `{k}`: bad header entry: {e}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    /// Same tensors as candle's whole-file reader; truncation and junk are errors.
    #[test]
    fn reads_what_candle_reads_and_rejects_broken_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.safetensors");
        let dev = Device::Cpu;
        let mut m = HashMap::new();
        m.insert(
            "w".to_string(),
            Tensor::arange(0f32, 12., &dev)
                .unwrap()
                .reshape((3, 4))
                .unwrap(),
        );
        m.insert(
            "h".to_string(),
            Tensor::arange(0f32, 5., &dev)
                .unwrap()
                .to_dtype(DType::F16)
                .unwrap(),
        );
        m.insert("i".to_string(), Tensor::new(&[1i64, 2, 3], &dev).unwrap());
        candle_core::safetensors::save(&m, &p).unwrap();
        let ours = read_all(&p).unwrap();
        let mut sh = shapes(&p).unwrap();
        sh.sort();
        assert_eq!(
            sh,
            [
                ("h".to_string(), vec![5]),
                ("i".to_string(), vec![3]),
                ("w".to_string(), vec![3, 4])
            ]
        );
        let theirs = candle_core::safetensors::load(&p, &dev).unwrap();
        assert_eq!(ours.len(), 3);
        for (k, t) in &theirs {
            let o = &ours[k];
            assert_eq!((o.dtype(), o.dims()), (t.dtype(), t.dims()));
            let d = (o.to_dtype(DType::F64).unwrap() - t.to_dtype(DType::F64).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert_eq!(d, 0.0, "{k}");
        }
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 4]).unwrap();
        let e = read_all(&p).unwrap_err();
        assert!(e.contains("truncated"), "{e}");
        std::fs::write(&p, b"hello world, not a model").unwrap();
        assert!(read_all(&p).unwrap_err().contains("not a safetensors file"));
    }
}
