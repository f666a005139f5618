//! Pickle protocol 2 writer for [`Value`] trees, tensors as torch's persistent storages.

use super::Value;
use candle_core::{DType, Tensor};

// Opcodes (Python's pickle module names).
pub(super) const PROTO: u8 = 0x80;
pub(super) const STOP: u8 = b'.';
pub(super) const MARK: u8 = b'(';
pub(super) const NONE: u8 = b'N';
pub(super) const NEWTRUE: u8 = 0x88;
pub(super) const NEWFALSE: u8 = 0x89;
pub(super) const BININT: u8 = b'J';
pub(super) const BININT1: u8 = b'K';
pub(super) const BININT2: u8 = b'M';
pub(super) const LONG1: u8 = 0x8a;
pub(super) const BINFLOAT: u8 = b'G';
pub(super) const BINUNICODE: u8 = b'X';
pub(super) const EMPTY_LIST: u8 = b']';
pub(super) const APPENDS: u8 = b'e';
pub(super) const EMPTY_TUPLE: u8 = b')';
pub(super) const TUPLE: u8 = b't';
pub(super) const TUPLE1: u8 = 0x85;
pub(super) const TUPLE2: u8 = 0x86;
pub(super) const TUPLE3: u8 = 0x87;
pub(super) const EMPTY_DICT: u8 = b'}';
pub(super) const SETITEMS: u8 = b'u';
pub(super) const GLOBAL: u8 = b'c';
pub(super) const REDUCE: u8 = b'R';
pub(super) const BINPERSID: u8 = b'Q';

/// torch's storage class and element size for a dtype.
pub(super) fn storage_class(dt: DType) -> Option<(&'static str, usize)> {
    Some(match dt {
        DType::F32 => ("FloatStorage", 4),
        DType::F16 => ("HalfStorage", 2),
        DType::BF16 => ("BFloat16Storage", 2),
        DType::F64 => ("DoubleStorage", 8),
        DType::I64 => ("LongStorage", 8),
        DType::I32 => ("IntStorage", 4),
        DType::U8 => ("ByteStorage", 1),
        _ => return None,
    })
}

/// The pickle of `v`; each tensor's bytes are pushed to `storages` (key = index).
pub(super) fn pickle(v: &Value, storages: &mut Vec<Vec<u8>>) -> Result<Vec<u8>, String> {
    let mut out = vec![PROTO, 2];
    write(&mut out, v, storages)?;
    out.push(STOP);
    Ok(out)
}

fn global(out: &mut Vec<u8>, module: &str, name: &str) {
    out.push(GLOBAL);
    out.extend_from_slice(module.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(name.as_bytes());
    out.push(b'\n');
}

fn int(out: &mut Vec<u8>, i: i64) {
    if (0..0x100).contains(&i) {
        out.extend_from_slice(&[BININT1, i as u8]);
    } else if (0..0x10000).contains(&i) {
        out.push(BININT2);
        out.extend_from_slice(&(i as u16).to_le_bytes());
    } else if i32::try_from(i).is_ok() {
        out.push(BININT);
        out.extend_from_slice(&(i as i32).to_le_bytes());
    } else {
        // Shortest little-endian two's complement, as Python's encode_long.
        let mut b = i.to_le_bytes().to_vec();
        while b.len() > 1 {
            let (last, prev) = (b[b.len() - 1], b[b.len() - 2]);
            let redundant = (last == 0 && prev & 0x80 == 0) || (last == 0xff && prev & 0x80 != 0);
            if !redundant {
                break;
            }
            b.pop();
        }
        out.extend_from_slice(&[LONG1, b.len() as u8]);
        out.extend_from_slice(&b);
    }
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.push(BINUNICODE);
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn tuple(out: &mut Vec<u8>, items: &[Value], storages: &mut Vec<Vec<u8>>) -> Result<(), String> {
    match items.len() {
        0 => out.push(EMPTY_TUPLE),
        n @ 1..=3 => {
            for it in items {
                write(out, it, storages)?;
            }
            out.push([TUPLE1, TUPLE2, TUPLE3][n - 1]);
        }
        _ => {
            out.push(MARK);
            for it in items {
                write(out, it, storages)?;
            }
            out.push(TUPLE);
        }
    }
    Ok(())
}

fn set_items(
    out: &mut Vec<u8>,
    entries: &[(Value, Value)],
    storages: &mut Vec<Vec<u8>>,
) -> Result<(), String> {
    // Batches of 1000, as Python's pickler.
    for chunk in entries.chunks(1000) {
        out.push(MARK);
        for (k, v) in chunk {
            write(out, k, storages)?;
            write(out, v, storages)?;
        }
        out.push(SETITEMS);
    }
    Ok(())
}

fn empty_ordered_dict(out: &mut Vec<u8>) {
    global(out, "collections", "OrderedDict");
    out.extend_from_slice(&[EMPTY_TUPLE, REDUCE]);
}

fn tensor(out: &mut Vec<u8>, t: &Tensor, storages: &mut Vec<Vec<u8>>) -> Result<(), String> {
    let (class, size) = storage_class(t.dtype())
        .ok_or_else(|| format!("tensors of {:?} cannot be written to .pt", t.dtype()))?;
    let t_dims = t.dims().to_vec();
    let t = t
        .to_device(&candle_core::Device::Cpu)
        .and_then(|t| t.contiguous())
        .map_err(|e| e.to_string())?;
    let bytes = safetensors::View::data(&t).into_owned();
    debug_assert_eq!(bytes.len(), t.elem_count() * size);
    let key = storages.len();
    storages.push(bytes);
    global(out, "torch._utils", "_rebuild_tensor_v2");
    out.push(MARK);
    // Persistent id ("storage", torch.<Class>, "<key>", "cpu", numel).
    out.push(MARK);
    string(out, "storage");
    global(out, "torch", class);
    string(out, &key.to_string());
    string(out, "cpu");
    int(out, t.elem_count() as i64);
    out.push(TUPLE);
    out.push(BINPERSID);
    int(out, 0); // storage offset
    let dims: Vec<Value> = t_dims.iter().map(|&d| Value::Int(d as i64)).collect();
    let mut stride = vec![1i64; t_dims.len()];
    for i in (0..t_dims.len().saturating_sub(1)).rev() {
        stride[i] = stride[i + 1] * t_dims[i + 1] as i64;
    }
    let strides: Vec<Value> = stride.into_iter().map(Value::Int).collect();
    tuple(out, &dims, storages)?;
    tuple(out, &strides, storages)?;
    out.push(NEWFALSE); // requires_grad
    empty_ordered_dict(out); // backward hooks
    out.push(TUPLE);
    out.push(REDUCE);
    Ok(())
}

fn write(out: &mut Vec<u8>, v: &Value, storages: &mut Vec<Vec<u8>>) -> Result<(), String> {
    match v {
        Value::None => out.push(NONE),
        Value::Bool(b) => out.push(if *b { NEWTRUE } else { NEWFALSE }),
        Value::Int(i) => int(out, *i),
        Value::Float(f) => {
            out.push(BINFLOAT);
            out.extend_from_slice(&f.to_be_bytes());
        }
        Value::Str(s) => string(out, s),
        Value::List(items) => {
            out.push(EMPTY_LIST);
            if !items.is_empty() {
                out.push(MARK);
                for it in items {
                    write(out, it, storages)?;
                }
                out.push(APPENDS);
            }
        }
        Value::Tuple(items) => tuple(out, items, storages)?,
        Value::Dict(entries) => {
            out.push(EMPTY_DICT);
            set_items(out, entries, storages)?;
        }
        Value::OrderedDict(entries) => {
            empty_ordered_dict(out);
            set_items(out, entries, storages)?;
        }
        Value::Tensor(t) => tensor(out, t, storages)?,
    }
    Ok(())
}
