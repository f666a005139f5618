//! Reading `.safetensors` files one tensor at a time.
//!
//! `candle_core::safetensors::load` reads the whole file into memory and then converts every
//! tensor, so loading a 3.4 GB f32 SD1.5 UNet peaked at twice its size. Here the JSON header
//! is parsed first and each tensor's bytes are read straight into its own storage, in
//! parallel: the peak is the tensors themselves.

use candle_core::safetensors::Load;
use candle_core::{Device, Tensor};
use safetensors::tensor::{TensorInfo, TensorView};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

/// Header size limit (the safetensors reference implementation uses 100 MB).
const MAX_HEADER: u64 = 100_000_000;

/// Every tensor of a safetensors file on the CPU, in its stored dtype. Errors are one line
/// naming the reason (the caller adds the file name).
pub fn read_all(path: &Path) -> Result<HashMap<String, Tensor>, String> {
    read_all_with(path, |_, t| Ok(t))
}

/// [`read_all`], passing each tensor through `each(name, tensor)` (a dtype conversion) on
/// the thread that read it.
///
/// Tensors are read in parallel (rayon; each thread takes runs of the file in order),
/// straight into their own storage with positional reads: no shared cursor, no bounce
/// buffer for float tensors. The cost of loading is mostly the first touch of the fresh
/// memory the weights land in (on a VM, 1.5-3.5 s per GB on one core); spread over the
/// threads, a 3.4 GB SD1.5 UNet loads several times faster than tensor by tensor.
pub fn read_all_with(
    path: &Path,
    each: impl Fn(&str, Tensor) -> candle_core::Result<Tensor> + Sync,
) -> Result<HashMap<String, Tensor>, String> {
    use rayon::prelude::*;
    let file = File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let file_len = file.metadata().map_err(|e| e.to_string())?.len();
    let (n, header) = read_header(&mut BufReader::new(&file), file_len)?;
    let data_start = 8 + n;
    let data_len = file_len - data_start;

    // In file order, so each thread's reads are sequential.
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
    // Every entry is checked before anything is read: the error names the first bad
    // tensor in file order.
    for (name, info) in &infos {
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
    }
    let read = |(name, info): (String, TensorInfo)| -> Result<(String, Tensor), String> {
        let off = data_start + info.data_offsets.0 as u64;
        let len = info.data_offsets.1 - info.data_offsets.0;
        let t = read_tensor(&file, &info, off, len)
            .map_err(|e| format!("tensor `{name}`: cannot read its data: {e}"))?;
        let t = each(&name, t).map_err(|e| format!("tensor `{name}`: {e}"))?;
        Ok((name, t))
    };
    infos.into_par_iter().map(read).collect()
}

/// [`read_all_with`] converting every float tensor to `dtype` on its reading thread, except
/// those whose name `keep_as_stored` accepts; other dtypes stay as stored.
pub fn read_all_as(
    path: &Path,
    dtype: candle_core::DType,
    keep_as_stored: impl Fn(&str) -> bool + Sync,
) -> Result<HashMap<String, Tensor>, String> {
    read_all_with(path, |name, t| {
        if t.dtype().is_float() && !keep_as_stored(name) {
            t.to_dtype(dtype)
        } else {
            Ok(t)
        }
    })
}

/// One tensor's `len` bytes at `off`, on the CPU in its stored dtype.
fn read_tensor(file: &File, info: &TensorInfo, off: u64, len: usize) -> Result<Tensor, String> {
    use safetensors::Dtype;
    let shape = info.shape.clone();
    let io = |e: std::io::Error| e.to_string();
    let cpu = &Device::Cpu;
    let t = match info.dtype {
        Dtype::F32 if LE => {
            Tensor::from_vec(read_pod::<f32>(file, len, off).map_err(io)?, shape, cpu)
        }
        Dtype::F16 if LE => Tensor::from_vec(
            read_pod::<half::f16>(file, len, off).map_err(io)?,
            shape,
            cpu,
        ),
        Dtype::BF16 if LE => Tensor::from_vec(
            read_pod::<half::bf16>(file, len, off).map_err(io)?,
            shape,
            cpu,
        ),
        Dtype::F64 if LE => {
            Tensor::from_vec(read_pod::<f64>(file, len, off).map_err(io)?, shape, cpu)
        }
        _ => {
            // Integer and narrow float dtypes (small tensors): through candle's converter.
            let mut buf = vec![0u8; len];
            read_at(file, &mut buf, off).map_err(io)?;
            let view = TensorView::new(info.dtype, shape, &buf).map_err(|e| e.to_string())?;
            return view.load(cpu).map_err(|e| e.to_string());
        }
    };
    t.map_err(|e| e.to_string())
}

/// Whether stored (little-endian) bytes are the in-memory values as they are.
const LE: bool = cfg!(target_endian = "little");

/// Plain float types whose every bit pattern is a value.
trait Pod: Copy + Default {}
impl Pod for f32 {}
impl Pod for f64 {}
impl Pod for half::f16 {}
impl Pod for half::bf16 {}

/// `len` bytes at `off` read straight into a `Vec<T>` (little-endian targets).
fn read_pod<T: Pod>(file: &File, len: usize, off: u64) -> std::io::Result<Vec<T>> {
    let n = len / std::mem::size_of::<T>();
    let mut v = vec![T::default(); n];
    // SAFETY: `v` holds `n` initialised `T`s, i.e. `n * size_of::<T>()` == `len` bytes
    // (the caller checked that `len` is the shape's byte size); `T` is a plain float type
    // (`Pod`) for which any byte pattern is a valid value, and u8 has alignment 1.
    let bytes = unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), len) };
    read_at(file, bytes, off)?;
    Ok(v)
}

/// Positional read of exactly `buf.len()` bytes (shared `&File`, no cursor).
#[cfg(unix)]
fn read_at(file: &File, buf: &mut [u8], off: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.read_exact_at(buf, off)
}

#[cfg(windows)]
fn read_at(file: &File, mut buf: &mut [u8], mut off: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        let n = file.seek_read(buf, off)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf = &mut buf[n..];
        off += n as u64;
    }
    Ok(())
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

    /// Every float dtype read straight into its storage, integers through candle's
    /// converter, many tensors of odd sizes over the threads, and the per-tensor
    /// conversion: all equal to candle's whole-file reader.
    #[test]
    fn parallel_reads_every_dtype_and_converts_on_the_way() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        let dev = Device::Cpu;
        let ramp = |n: usize, dt: DType| {
            let t = Tensor::arange(0f32, n as f32, &dev).unwrap();
            ((t * 0.37).unwrap().sin().unwrap() * 100.0)
                .unwrap()
                .to_dtype(dt)
                .unwrap()
        };
        let mut m = HashMap::new();
        for (i, dt) in [
            DType::F32,
            DType::F16,
            DType::BF16,
            DType::F64,
            DType::U32,
            DType::I64,
        ]
        .into_iter()
        .cycle()
        .take(60)
        .enumerate()
        {
            let t = ramp(i * 53 + 1, DType::F32)
                .abs()
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            m.insert(format!("t{i}"), t);
        }
        m.insert("big".to_string(), ramp(300_001, DType::F16));
        candle_core::safetensors::save(&m, &p).unwrap();
        let theirs = candle_core::safetensors::load(&p, &dev).unwrap();
        let same = |a: &Tensor, b: &Tensor| {
            assert_eq!((a.dtype(), a.dims()), (b.dtype(), b.dims()));
            let f = |t: &Tensor| t.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
            assert_eq!(
                f(a).to_vec1::<f64>().unwrap(),
                f(b).to_vec1::<f64>().unwrap()
            );
        };
        let ours = read_all(&p).unwrap();
        assert_eq!(ours.len(), theirs.len());
        for (k, t) in &theirs {
            same(&ours[k], t);
        }
        let conv = read_all_as(&p, DType::F32, |_| false).unwrap();
        let kept = read_all_as(&p, DType::F32, |name| name == "big").unwrap();
        assert_eq!(kept["big"].dtype(), DType::F16);
        assert_eq!(kept["t1"].dtype(), DType::F32);
        for (k, t) in &theirs {
            let want = match t.dtype().is_float() {
                true => t.to_dtype(DType::F32).unwrap(),
                false => t.clone(),
            };
            same(&conv[k], &want);
        }
        let e = read_all_with(&p, |name, t| match name {
            "t7" => Err(candle_core::Error::Msg("no room".into())),
            _ => Ok(t),
        })
        .unwrap_err();
        assert_eq!(e, "tensor `t7`: no room");
    }
}
