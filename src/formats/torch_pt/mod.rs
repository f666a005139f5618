//! torch's zip-pickle `.pt` files (what `torch.save` writes and webui reads for
//! hypernetworks and Textual Inversion embeddings), for a small tree of plain values.
//!
//! Layout: a zip with STORED entries under one top folder — `archive/data.pkl` (pickle
//! protocol 2), `archive/data/<N>` (each tensor's raw little-endian storage, aligned to 64
//! bytes as torch aligns it) and `archive/version` (`3`). A tensor is pickled as
//! `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad,
//! OrderedDict())` with the storage a persistent id `("storage", torch.FloatStorage, "N",
//! "cpu", numel)`. These are the only globals used, all on the allow-lists of
//! `torch.load(weights_only=True)` and of webui's safe unpickler.
//!
//! [`save`] writes a [`Value`] tree; [`load`] reads the same subset back (int and str
//! dict keys, lists, tuples, OrderedDicts, scalars, f32 / f16 / bf16 / integer tensors),
//! which is what webui's hypernetwork and embedding files hold.

mod pickle;
mod unpickle;

use candle_core::Tensor;
use std::io::{Read, Seek, Write};
use std::path::Path;

/// A pickled value.
#[derive(Clone, Debug)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    List(Vec<Value>),
    Tuple(Vec<Value>),
    /// A plain `dict`, in insertion order.
    Dict(Vec<(Value, Value)>),
    /// `collections.OrderedDict` (a module's `state_dict()`).
    OrderedDict(Vec<(Value, Value)>),
    /// A CPU tensor (f32, f16, bf16, i64, i32, u8 are written; read likewise).
    Tensor(Tensor),
}

impl Value {
    pub fn str(s: impl Into<String>) -> Self {
        Value::Str(s.into())
    }

    /// The entry of a dict / OrderedDict under `key`.
    pub fn get(&self, key: &Value) -> Option<&Value> {
        match self {
            Value::Dict(e) | Value::OrderedDict(e) => {
                e.iter().find(|(k, _)| k.same_key(key)).map(|(_, v)| v)
            }
            _ => None,
        }
    }

    /// The entry of a dict under the string `key`.
    pub fn get_str(&self, key: &str) -> Option<&Value> {
        self.get(&Value::Str(key.to_string()))
    }

    /// Dict / OrderedDict entries (empty for anything else).
    pub fn entries(&self) -> &[(Value, Value)] {
        match self {
            Value::Dict(e) | Value::OrderedDict(e) => e,
            _ => &[],
        }
    }

    fn same_key(&self, other: &Value) -> bool {
        match (self, other) {
            (Value::Str(a), Value::Str(b)) => a == b,
            (Value::Int(a), Value::Int(b)) => a == b,
            (Value::Bool(a), Value::Bool(b)) => a == b,
            (Value::None, Value::None) => true,
            _ => false,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// An int, or a bool as Python treats it (0 / 1).
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }

    /// A float, or an int / bool as a number.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Float(f) => Some(*f),
            _ => self.as_int().map(|i| i as f64),
        }
    }

    /// Python truthiness of a scalar (`None`, `0`, `0.0`, `""`, empty containers: false).
    pub fn truthy(&self) -> bool {
        match self {
            Value::None => false,
            Value::Bool(b) => *b,
            Value::Int(i) => *i != 0,
            Value::Float(f) => *f != 0.0,
            Value::Str(s) => !s.is_empty(),
            Value::List(v) | Value::Tuple(v) => !v.is_empty(),
            Value::Dict(e) | Value::OrderedDict(e) => !e.is_empty(),
            Value::Tensor(_) => true,
        }
    }

    /// Items of a list or tuple.
    pub fn items(&self) -> Option<&[Value]> {
        match self {
            Value::List(v) | Value::Tuple(v) => Some(v),
            _ => None,
        }
    }
}

/// Errors reading or writing a `.pt` file; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum PtError {
    #[error("{path}: {msg}")]
    Format { path: String, msg: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn format_err(path: &Path, msg: impl Into<String>) -> PtError {
    PtError::Format {
        path: path.display().to_string(),
        msg: msg.into(),
    }
}

/// The folder every entry lives under (what recent torch versions write).
const TOP: &str = "archive";

/// The bytes of a `.pt` file holding `value`.
pub fn to_bytes(value: &Value) -> Result<Vec<u8>, String> {
    let mut storages = Vec::new();
    let pkl = pickle::pickle(value, &mut storages)?;
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    // torch pads each entry's local header ("FB" extra field) so data starts on 64 bytes.
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .with_alignment_and_header_id(64, 0x4246);
    let ze = |e: zip::result::ZipError| e.to_string();
    let mut entry = |name: String, bytes: &[u8]| -> Result<(), String> {
        zip.start_file(name, opts).map_err(ze)?;
        zip.write_all(bytes).map_err(|e| e.to_string())
    };
    entry(format!("{TOP}/data.pkl"), &pkl)?;
    for (i, bytes) in storages.iter().enumerate() {
        entry(format!("{TOP}/data/{i}"), bytes)?;
    }
    entry(format!("{TOP}/version"), b"3\n")?;
    Ok(zip.finish().map_err(ze)?.into_inner())
}

/// Write `value` to `path` atomically.
pub fn save(path: &Path, value: &Value) -> Result<(), PtError> {
    let bytes = to_bytes(value).map_err(|m| format_err(path, m))?;
    crate::util::atomic::write_atomic(path, &bytes).map_err(|source| PtError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Read the value a `.pt` file holds (torch's zip format; not the pre-1.6 legacy format).
pub fn load(path: &Path) -> Result<Value, PtError> {
    let f = std::fs::File::open(path).map_err(|source| PtError::Io {
        path: path.display().to_string(),
        source,
    })?;
    from_reader(std::io::BufReader::new(f)).map_err(|m| format_err(path, m))
}

/// Read a `.pt` from any seekable reader.
pub fn from_reader<R: Read + Seek>(r: R) -> Result<Value, String> {
    let mut zip = zip::ZipArchive::new(r).map_err(|e| {
        format!("not a torch zip file ({e}); files saved by torch before 1.6 are not supported")
    })?;
    let pkl_name = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .find(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .ok_or("no <folder>/data.pkl entry: not a torch.save file")?;
    let top = pkl_name.trim_end_matches("data.pkl").to_string();
    let mut pkl = Vec::new();
    zip.by_name(&pkl_name)
        .and_then(|mut f| Ok(f.read_to_end(&mut pkl)?))
        .map_err(|e| format!("{pkl_name}: {e}"))?;
    let mut storage = |key: &str| -> Result<Vec<u8>, String> {
        let name = format!("{top}data/{key}");
        let mut buf = Vec::new();
        zip.by_name(&name)
            .and_then(|mut f| Ok(f.read_to_end(&mut buf)?))
            .map_err(|e| format!("{name}: {e}"))?;
        Ok(buf)
    };
    unpickle::unpickle(&pkl, &mut storage)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn round_trip_keeps_structure_and_values() {
        let t = Tensor::arange(0f32, 6.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let h = t.to_dtype(DType::F16).unwrap();
        let state = Value::OrderedDict(vec![
            (Value::str("linear.0.weight"), Value::Tensor(t.clone())),
            (Value::str("linear.0.bias"), Value::Tensor(h)),
        ]);
        let v = Value::Dict(vec![
            (
                Value::Int(768),
                Value::Tuple(vec![state.clone(), state.clone()]),
            ),
            (Value::str("step"), Value::Int(-3_000_000_000)),
            (Value::str("big"), Value::Int(70_000)),
            (Value::str("name"), Value::str("ünï")),
            (
                Value::str("layer_structure"),
                Value::List(vec![Value::Float(1.0), Value::Float(2.5)]),
            ),
            (Value::str("flag"), Value::Bool(true)),
            (Value::str("none"), Value::None),
            (Value::str("empty"), Value::Tuple(vec![])),
        ]);
        let bytes = to_bytes(&v).unwrap();
        let back = from_reader(std::io::Cursor::new(bytes)).unwrap();
        let pair = back.get(&Value::Int(768)).unwrap().items().unwrap();
        assert_eq!(pair.len(), 2);
        let Value::Tensor(w) = pair[1].get_str("linear.0.weight").unwrap() else {
            panic!("not a tensor")
        };
        assert_eq!(w.dims(), &[2, 3]);
        assert_eq!(
            w.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![0., 1., 2., 3., 4., 5.]
        );
        let Value::Tensor(b) = pair[0].get_str("linear.0.bias").unwrap() else {
            panic!("not a tensor")
        };
        assert_eq!(b.dtype(), DType::F16);
        assert_eq!(back.get_str("step").unwrap().as_int(), Some(-3_000_000_000));
        assert_eq!(back.get_str("big").unwrap().as_int(), Some(70_000));
        assert_eq!(back.get_str("name").unwrap().as_str(), Some("ünï"));
        let ls = back.get_str("layer_structure").unwrap().items().unwrap();
        assert_eq!(ls[1].as_f64(), Some(2.5));
        assert!(back.get_str("flag").unwrap().truthy());
        assert!(matches!(back.get_str("none"), Some(Value::None)));
        assert!(matches!(back.get_str("empty"), Some(Value::Tuple(v)) if v.is_empty()));
    }

    #[test]
    fn entries_are_stored_under_one_folder_and_aligned() {
        let t = Tensor::ones(5, DType::F32, &Device::Cpu).unwrap();
        let v = Value::Dict(vec![(Value::str("a"), Value::Tensor(t))]);
        let bytes = to_bytes(&v).unwrap();
        let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
        let mut sorted: Vec<String> = zip.file_names().map(|n| n.unwrap().into_owned()).collect();
        sorted.sort();
        assert_eq!(
            sorted,
            ["archive/data.pkl", "archive/data/0", "archive/version"]
        );
        for i in 0..zip.len() {
            let f = zip.by_index(i).unwrap();
            assert_eq!(f.compression(), zip::CompressionMethod::Stored);
            if f.name().unwrap() == "archive/data/0" {
                assert_eq!(f.data_start().unwrap() % 64, 0);
                assert_eq!(f.size(), 20);
            }
        }
    }

    #[test]
    fn garbage_is_a_clear_error() {
        let e = from_reader(std::io::Cursor::new(b"not a zip".to_vec())).unwrap_err();
        assert!(e.contains("not a torch zip file"), "{e}");
    }
}
