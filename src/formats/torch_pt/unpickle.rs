//! A small unpickler for what `torch.save` emits (protocol 2, and the few protocol 3-4
//! opcodes a newer `pickle_protocol` adds): plain values, dicts with any scalar keys,
//! tuples, OrderedDicts and tensors. Globals other than OrderedDict, the tensor
//! rebuilders and torch's storage classes are rejected, as torch's `weights_only` does.

use super::Value;
use super::pickle::*;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;

#[derive(Clone, Debug)]
enum Obj {
    V(Value),
    Mark,
    Global(String, String),
    /// A persistent storage: dtype, the bytes of `data/<key>`.
    Storage(DType, std::rc::Rc<Vec<u8>>),
    /// A tuple holding a global or a storage (a persistent id, tensor arguments).
    Raw(Vec<Obj>),
}

/// A tuple of stack objects: a [`Value`] when every item is one.
fn tuple_of(items: Vec<Obj>) -> Obj {
    if items.iter().all(|o| matches!(o, Obj::V(_))) {
        let vals = items
            .into_iter()
            .filter_map(|o| match o {
                Obj::V(v) => Some(v),
                _ => None,
            })
            .collect();
        Obj::V(Value::Tuple(vals))
    } else {
        Obj::Raw(items)
    }
}

const BINPUT: u8 = b'q';
const LONG_BINPUT: u8 = b'r';
const BINGET: u8 = b'h';
const LONG_BINGET: u8 = b'j';
const MEMOIZE: u8 = 0x94;
const FRAME: u8 = 0x95;
const SHORT_BINUNICODE: u8 = 0x8c;
const STACK_GLOBAL: u8 = 0x93;
const APPEND: u8 = b'a';
const SETITEM: u8 = b's';
const BUILD: u8 = b'b';
const POP: u8 = b'0';
const NEWOBJ: u8 = 0x81;

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.b.len());
        let end = end.ok_or("data.pkl is truncated")?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn line(&mut self) -> Result<String, String> {
        let rest = &self.b[self.pos..];
        let n = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or("data.pkl is truncated")?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }
    fn utf8(&mut self, n: usize) -> Result<String, String> {
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| "a string is not UTF-8".into())
    }
}

fn value(o: Obj) -> Result<Value, String> {
    match o {
        Obj::V(v) => Ok(v),
        Obj::Mark => Err("unexpected MARK".into()),
        Obj::Global(m, n) => Err(format!("a bare global {m}.{n} is not a value")),
        Obj::Storage(..) | Obj::Raw(_) => Err("a storage outside a tensor".into()),
    }
}

fn storage_dtype(class: &str) -> Option<DType> {
    [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::F64,
        DType::I64,
        DType::I32,
        DType::U8,
    ]
    .into_iter()
    .find(|&d| storage_class(d).is_some_and(|(c, _)| c == class))
}

fn usizes(v: &Value, what: &str) -> Result<Vec<usize>, String> {
    v.items()
        .ok_or(format!("tensor {what} is not a tuple"))?
        .iter()
        .map(|x| {
            x.as_int()
                .and_then(|i| usize::try_from(i).ok())
                .ok_or(format!("bad tensor {what}"))
        })
        .collect()
}

/// `_rebuild_tensor_v2(storage, offset, size, stride, ...)`: the viewed elements, copied
/// into a contiguous tensor.
fn rebuild_tensor(args: Vec<Obj>) -> Result<Value, String> {
    let mut it = args.into_iter();
    let Some(Obj::Storage(dtype, bytes)) = it.next() else {
        return Err("tensor without a storage".into());
    };
    let offset = it.next().map(value).transpose()?.and_then(|v| v.as_int());
    let offset = offset.ok_or("bad tensor offset")? as usize;
    let size = usizes(&it.next().map(value).transpose()?.ok_or("no size")?, "size")?;
    let stride = usizes(
        &it.next().map(value).transpose()?.ok_or("no stride")?,
        "stride",
    )?;
    if size.len() != stride.len() {
        return Err("tensor size and stride differ in length".into());
    }
    let es = dtype.size_in_bytes();
    let numel: usize = size.iter().product();
    let mut out = Vec::with_capacity(numel * es);
    let mut idx = vec![0usize; size.len()];
    for _ in 0..numel {
        let e = offset + idx.iter().zip(&stride).map(|(i, s)| i * s).sum::<usize>();
        let src = bytes
            .get(e * es..(e + 1) * es)
            .ok_or("a tensor reaches past its storage")?;
        out.extend_from_slice(src);
        for d in (0..size.len()).rev() {
            idx[d] += 1;
            if idx[d] < size[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    Tensor::from_raw_buffer(&out, dtype, &size, &Device::Cpu)
        .map(Value::Tensor)
        .map_err(|e| e.to_string())
}

fn reduce(func: Obj, args: Obj) -> Result<Obj, String> {
    let Obj::Global(m, n) = func else {
        return Err("REDUCE of something that is not a global".into());
    };
    if m == "torch._utils" && n == "_rebuild_tensor_v2" {
        let Obj::Raw(args) = args else {
            return Err("tensor without a storage".into());
        };
        return rebuild_tensor(args).map(Obj::V);
    }
    let args = match args {
        Obj::V(Value::Tuple(a)) => a,
        _ => return Err(format!("{m}.{n}: arguments are not a tuple of values")),
    };
    Ok(Obj::V(match (m.as_str(), n.as_str()) {
        ("collections", "OrderedDict") if args.is_empty() => Value::OrderedDict(vec![]),
        ("torch._utils", "_rebuild_parameter") => {
            args.into_iter().next().ok_or("empty _rebuild_parameter")?
        }
        _ => return Err(format!("unsupported call {m}.{n}")),
    }))
}

fn pop_mark(stack: &mut Vec<Obj>) -> Result<Vec<Obj>, String> {
    let at = stack
        .iter()
        .rposition(|o| matches!(o, Obj::Mark))
        .ok_or("MARK missing")?;
    let items = stack.split_off(at + 1);
    stack.pop();
    Ok(items)
}

fn set_items(target: &mut Obj, kv: Vec<Value>) -> Result<(), String> {
    let Obj::V(Value::Dict(e) | Value::OrderedDict(e)) = target else {
        return Err("SETITEMS on something that is not a dict".into());
    };
    let mut it = kv.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        match e.iter_mut().find(|(ek, _)| ek.same_key(&k)) {
            Some(slot) => slot.1 = v,
            None => e.push((k, v)),
        }
    }
    Ok(())
}

/// Unpickle `data.pkl`; `storage(key)` gives the bytes of `data/<key>`.
pub(super) fn unpickle(
    b: &[u8],
    storage: &mut dyn FnMut(&str) -> Result<Vec<u8>, String>,
) -> Result<Value, String> {
    let mut r = Reader { b, pos: 0 };
    let mut stack: Vec<Obj> = Vec::new();
    let mut memo: HashMap<u32, Obj> = HashMap::new();
    let mut loaded: HashMap<String, std::rc::Rc<Vec<u8>>> = HashMap::new();
    let pop = |stack: &mut Vec<Obj>| stack.pop().ok_or_else(|| "stack underflow".to_string());
    loop {
        let op = r.u8()?;
        match op {
            PROTO => {
                r.u8()?;
            }
            FRAME => {
                r.take(8)?;
            }
            STOP => return value(pop(&mut stack)?),
            MARK => stack.push(Obj::Mark),
            POP => {
                pop(&mut stack)?;
            }
            NONE => stack.push(Obj::V(Value::None)),
            NEWTRUE => stack.push(Obj::V(Value::Bool(true))),
            NEWFALSE => stack.push(Obj::V(Value::Bool(false))),
            BININT => {
                let v = i32::from_le_bytes(r.take(4)?.try_into().unwrap());
                stack.push(Obj::V(Value::Int(v as i64)));
            }
            BININT1 => stack.push(Obj::V(Value::Int(r.u8()? as i64))),
            BININT2 => {
                let v = u16::from_le_bytes(r.take(2)?.try_into().unwrap());
                stack.push(Obj::V(Value::Int(v as i64)));
            }
            LONG1 => {
                let n = r.u8()? as usize;
                let bytes = r.take(n)?;
                if n > 8 {
                    return Err("an integer wider than 64 bits".into());
                }
                let fill = if bytes.last().is_some_and(|&x| x & 0x80 != 0) {
                    0xff
                } else {
                    0
                };
                let mut full = [fill; 8];
                full[..n].copy_from_slice(bytes);
                stack.push(Obj::V(Value::Int(i64::from_le_bytes(full))));
            }
            BINFLOAT => {
                let v = f64::from_be_bytes(r.take(8)?.try_into().unwrap());
                stack.push(Obj::V(Value::Float(v)));
            }
            BINUNICODE => {
                let n = r.u32()? as usize;
                stack.push(Obj::V(Value::Str(r.utf8(n)?)));
            }
            SHORT_BINUNICODE => {
                let n = r.u8()? as usize;
                stack.push(Obj::V(Value::Str(r.utf8(n)?)));
            }
            EMPTY_LIST => stack.push(Obj::V(Value::List(vec![]))),
            EMPTY_TUPLE => stack.push(Obj::V(Value::Tuple(vec![]))),
            EMPTY_DICT => stack.push(Obj::V(Value::Dict(vec![]))),
            TUPLE => {
                let items = pop_mark(&mut stack)?;
                stack.push(tuple_of(items));
            }
            TUPLE1 | TUPLE2 | TUPLE3 => {
                let n = (op - TUPLE1 + 1) as usize;
                if stack.len() < n {
                    return Err("stack underflow".into());
                }
                let items = stack.split_off(stack.len() - n);
                stack.push(tuple_of(items));
            }
            APPEND | APPENDS => {
                let items = if op == APPEND {
                    vec![pop(&mut stack)?]
                } else {
                    pop_mark(&mut stack)?
                };
                let items: Vec<Value> = items.into_iter().map(value).collect::<Result<_, _>>()?;
                match stack.last_mut() {
                    Some(Obj::V(Value::List(l))) => l.extend(items),
                    _ => return Err("APPEND to something that is not a list".into()),
                }
            }
            SETITEM | SETITEMS => {
                let kv = if op == SETITEM {
                    let v = pop(&mut stack)?;
                    let k = pop(&mut stack)?;
                    vec![k, v]
                } else {
                    pop_mark(&mut stack)?
                };
                let kv: Vec<Value> = kv.into_iter().map(value).collect::<Result<_, _>>()?;
                set_items(stack.last_mut().ok_or("stack underflow")?, kv)?;
            }
            GLOBAL => {
                let m = r.line()?;
                let n = r.line()?;
                stack.push(Obj::Global(m, n));
            }
            STACK_GLOBAL => {
                let n = value(pop(&mut stack)?)?;
                let m = value(pop(&mut stack)?)?;
                match (m, n) {
                    (Value::Str(m), Value::Str(n)) => stack.push(Obj::Global(m, n)),
                    _ => return Err("STACK_GLOBAL of non-strings".into()),
                }
            }
            REDUCE | NEWOBJ => {
                let args = pop(&mut stack)?;
                let func = pop(&mut stack)?;
                stack.push(reduce(func, args)?);
            }
            BUILD => {
                // An object's __dict__ (a state_dict's `_metadata`): not part of the data.
                pop(&mut stack)?;
            }
            BINPERSID => {
                let pid = pop(&mut stack)?;
                stack.push(persistent(pid, storage, &mut loaded)?);
            }
            BINPUT => {
                let i = r.u8()? as u32;
                memo.insert(i, stack.last().ok_or("stack underflow")?.clone());
            }
            LONG_BINPUT => {
                let i = r.u32()?;
                memo.insert(i, stack.last().ok_or("stack underflow")?.clone());
            }
            MEMOIZE => {
                let i = memo.len() as u32;
                memo.insert(i, stack.last().ok_or("stack underflow")?.clone());
            }
            BINGET | LONG_BINGET => {
                let i = if op == BINGET {
                    r.u8()? as u32
                } else {
                    r.u32()?
                };
                stack.push(memo.get(&i).cloned().ok_or("memo key missing")?);
            }
            _ => {
                return Err(format!(
                    "unsupported pickle opcode 0x{op:02x} at byte {}",
                    r.pos - 1
                ));
            }
        }
    }
}

/// `("storage", torch.<Class>Storage, key, location, numel)` -> the storage's bytes.
fn persistent(
    pid: Obj,
    storage: &mut dyn FnMut(&str) -> Result<Vec<u8>, String>,
    loaded: &mut HashMap<String, std::rc::Rc<Vec<u8>>>,
) -> Result<Obj, String> {
    let Obj::Raw(items) = pid else {
        return Err("unsupported persistent id".into());
    };
    let (class, key) = match items.as_slice() {
        [
            Obj::V(Value::Str(tag)),
            Obj::Global(m, class),
            Obj::V(Value::Str(key)),
            ..,
        ] if tag == "storage" && m == "torch" => (class.clone(), key.clone()),
        _ => return Err("unsupported persistent id".into()),
    };
    let dtype = storage_dtype(&class).ok_or(format!("unsupported storage torch.{class}"))?;
    if !loaded.contains_key(&key) {
        loaded.insert(key.clone(), std::rc::Rc::new(storage(&key)?));
    }
    Ok(Obj::Storage(dtype, loaded[&key].clone()))
}
