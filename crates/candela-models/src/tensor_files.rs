//! Tensors as callers serialize them, read without trusting them: a
//! `torch.save` archive (a zip of `data.pkl` plus raw storages), a numpy
//! `.npy` file, or a safetensors blob. The pickle is never executed: a
//! small reader understands the opcodes `torch.save` writes and accepts
//! only the globals that rebuild a tensor (or a dict of tensors); anything
//! else is refused. Every failure is a [`MediaError::Invalid`] (HTTP 400).

use std::collections::HashMap;
use std::io::{Cursor, Read};
use std::rc::Rc;

use candela_media::MediaError;
use safetensors::tensor::{Dtype, SafeTensors};

fn invalid(msg: impl Into<String>) -> MediaError {
    MediaError::Invalid(msg.into())
}

/// A dense row-major tensor with little-endian elements.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// The tensors of one file: unnamed for a file of one tensor (`.npy`,
/// `torch.save(tensor)`), named for a dict or safetensors.
pub type Tensors = Vec<(Option<String>, RawTensor)>;

const ZIP_MAGIC: &[u8] = b"PK\x03\x04";
const NPY_MAGIC: &[u8] = b"\x93NUMPY";
/// A tensor's `data.pkl` is a few hundred bytes; a dict of a few tensors,
/// a few KiB. Anything much larger is not what `torch.save` writes for these.
const MAX_PICKLE_BYTES: u64 = 1 << 16;
/// Pickle values alive at once (stack + memo).
const MAX_PICKLE_VALUES: usize = 1 << 12;
/// Nesting of tuples and dicts (a tensor's pickle nests 4 deep); bounds the
/// recursion of dropping a value.
const MAX_PICKLE_DEPTH: usize = 32;

/// Read every tensor of a `torch.save` archive, `.npy` file or safetensors blob.
/// `what` names the field in messages (`image_embeds`).
pub fn read_tensors(bytes: &[u8], what: &str) -> Result<Tensors, MediaError> {
    if bytes.starts_with(ZIP_MAGIC) {
        read_torch(bytes).map_err(|e| invalid(format!("{what}: torch.save archive: {e}")))
    } else if bytes.starts_with(NPY_MAGIC) {
        read_npy(bytes)
            .map(|t| vec![(None, t)])
            .map_err(|e| invalid(format!("{what}: .npy file: {e}")))
    } else if bytes.starts_with(b"\x80") {
        Err(invalid(format!(
            "{what} is a legacy (pre-1.6) torch.save file; save it with torch.save's default zip format"
        )))
    } else {
        read_safetensors(bytes).map_err(|e| {
            invalid(format!(
                "{what} is neither a torch.save archive nor a .npy file, and not a valid safetensors blob: {e}"
            ))
        })
    }
}

fn read_safetensors(bytes: &[u8]) -> Result<Tensors, String> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
    let mut out: Tensors = st
        .tensors()
        .into_iter()
        .map(|(name, t)| {
            let raw = RawTensor {
                dtype: t.dtype(),
                shape: t.shape().to_vec(),
                data: t.data().to_vec(),
            };
            (Some(name), raw)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Element size and little-endian-ness of a numpy dtype string (`<f4`).
fn npy_dtype(descr: &str) -> Result<(Dtype, bool), String> {
    let (order, code) = descr.split_at(descr.len().min(1));
    let big = match order {
        "<" | "|" | "=" => false,
        ">" => true,
        _ => return Err(format!("unsupported dtype {descr:?}")),
    };
    let dtype = match code {
        "f2" => Dtype::F16,
        "f4" => Dtype::F32,
        "f8" => Dtype::F64,
        "i1" => Dtype::I8,
        "u1" => Dtype::U8,
        "i2" => Dtype::I16,
        "u2" => Dtype::U16,
        "i4" => Dtype::I32,
        "u4" => Dtype::U32,
        "i8" => Dtype::I64,
        "u8" => Dtype::U64,
        "b1" => Dtype::BOOL,
        _ => return Err(format!("unsupported dtype {descr:?}")),
    };
    Ok((dtype, big))
}

/// The value after `'key':` in a `.npy` header dict, up to its end.
fn npy_field<'a>(header: &'a str, key: &str) -> Result<&'a str, String> {
    let pat = format!("'{key}':");
    let at = header
        .find(&pat)
        .ok_or_else(|| format!("the header has no {key:?}"))?;
    Ok(header[at + pat.len()..].trim_start())
}

fn read_npy(bytes: &[u8]) -> Result<RawTensor, String> {
    let major = *bytes.get(6).ok_or("truncated header")?;
    let (len, start): (usize, usize) = match major {
        1 => (
            u16::from_le_bytes([
                bytes.get(8).copied().ok_or("truncated")?,
                bytes.get(9).copied().ok_or("truncated")?,
            ]) as usize,
            10,
        ),
        2 | 3 => {
            let b: [u8; 4] = bytes
                .get(8..12)
                .ok_or("truncated header")?
                .try_into()
                .map_err(|_| "truncated")?;
            (u32::from_le_bytes(b) as usize, 12)
        }
        v => return Err(format!("unsupported format version {v}")),
    };
    let header = bytes
        .get(start..start.saturating_add(len))
        .ok_or("truncated header")?;
    let header = std::str::from_utf8(header).map_err(|_| "the header is not text")?;
    let descr = npy_field(header, "descr")?;
    let descr = descr
        .strip_prefix('\'')
        .and_then(|d| d.split('\'').next())
        .ok_or("descr must be a simple dtype such as '<f4' (structured arrays are not tensors)")?;
    let (dtype, big) = npy_dtype(descr)?;
    let fortran = npy_field(header, "fortran_order")?.starts_with("True");
    let shape = npy_field(header, "shape")?;
    let shape = shape
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or("shape must be a tuple")?;
    let shape = shape
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse::<usize>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| format!("shape ({shape}) must be non-negative integers"))?;
    let numel = numel(&shape)?;
    let size = elem_size(dtype);
    let data = &bytes[start + len..];
    if numel.checked_mul(size) != Some(data.len()) {
        return Err(format!(
            "shape {shape:?} of {descr} needs {} bytes of data, the file has {}",
            numel.saturating_mul(size),
            data.len()
        ));
    }
    let mut data = data.to_vec();
    if big && size > 1 {
        data.chunks_exact_mut(size).for_each(<[u8]>::reverse);
    }
    if fortran && shape.len() > 1 {
        // Column-major: element (i0, .., in) is at sum(ik * prod(shape[..k])).
        let mut strides = vec![1usize; shape.len()];
        for k in 1..shape.len() {
            strides[k] = strides[k - 1] * shape[k - 1];
        }
        data = gather(&data, size, &shape, &strides, 0);
    }
    Ok(RawTensor { dtype, shape, data })
}

/// Bytes per element (every dtype read here is whole bytes).
fn elem_size(dtype: Dtype) -> usize {
    dtype.bitsize().div_ceil(8)
}

fn numel(shape: &[usize]) -> Result<usize, String> {
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| format!("shape {shape:?} is too large"))
}

/// Copy the strided view (`offset`, `strides` in elements) into row-major order.
fn gather(src: &[u8], size: usize, shape: &[usize], strides: &[usize], offset: usize) -> Vec<u8> {
    let n: usize = shape.iter().product();
    let mut out = Vec::with_capacity(n * size);
    let mut index = vec![0usize; shape.len()];
    for _ in 0..n {
        let at = offset + index.iter().zip(strides).map(|(i, s)| i * s).sum::<usize>();
        out.extend_from_slice(&src[at * size..(at + 1) * size]);
        for k in (0..shape.len()).rev() {
            index[k] += 1;
            if index[k] < shape[k] {
                break;
            }
            index[k] = 0;
        }
    }
    out
}

/// A value of the restricted pickle machine. Compound values are shared
/// (`Rc`), so a memo reference costs nothing however often it is used.
#[derive(Debug, Clone)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Str(Rc<str>),
    Tuple(Rc<Seq<Value>>),
    Dict(Rc<Seq<(Value, Value)>>),
    Mark,
    /// An allowed global, by what it rebuilds.
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
}

/// Items of a tuple or dict, with how deep they nest.
#[derive(Debug)]
struct Seq<T> {
    items: Vec<T>,
    depth: usize,
}

impl Value {
    fn depth(&self) -> usize {
        match self {
            Value::Tuple(s) => s.depth,
            Value::Dict(s) => s.depth,
            _ => 0,
        }
    }

    /// What the value is, for messages (never its contents: a shared value
    /// can be exponentially large when printed).
    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "a bool",
            Value::Int(_) => "an int",
            Value::Str(_) => "a string",
            Value::Tuple(_) => "a tuple",
            Value::Dict(_) => "a dict",
            Value::Mark => "a MARK",
            Value::Global(_) => "a class",
            Value::Storage(_) => "a storage",
            Value::Tensor(_) => "a tensor",
        }
    }

    fn tuple(items: Vec<Value>) -> Result<Value, String> {
        let depth = 1 + items.iter().map(Value::depth).max().unwrap_or(0);
        if depth > MAX_PICKLE_DEPTH {
            return Err("the pickle nests too deep".into());
        }
        Ok(Value::Tuple(Rc::new(Seq { items, depth })))
    }

    fn empty_dict() -> Value {
        Value::Dict(Rc::new(Seq {
            items: Vec::new(),
            depth: 1,
        }))
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Global {
    RebuildTensor,
    OrderedDict,
    Storage(Dtype),
}

#[derive(Debug)]
struct StorageRef {
    dtype: Dtype,
    key: String,
    numel: usize,
}

#[derive(Debug)]
struct TensorRef {
    storage: Rc<StorageRef>,
    offset: usize,
    shape: Vec<usize>,
    strides: Vec<usize>,
}

/// The globals `torch.save` writes for plain tensors; nothing else loads.
fn global(module: &str, name: &str) -> Result<Global, String> {
    let dtype = match (module, name) {
        ("torch._utils", "_rebuild_tensor_v2") => return Ok(Global::RebuildTensor),
        ("collections", "OrderedDict") => return Ok(Global::OrderedDict),
        ("torch", "FloatStorage") => Dtype::F32,
        ("torch", "DoubleStorage") => Dtype::F64,
        ("torch", "HalfStorage") => Dtype::F16,
        ("torch", "BFloat16Storage") => Dtype::BF16,
        ("torch", "LongStorage") => Dtype::I64,
        ("torch", "IntStorage") => Dtype::I32,
        ("torch", "ShortStorage") => Dtype::I16,
        ("torch", "CharStorage") => Dtype::I8,
        ("torch", "ByteStorage") => Dtype::U8,
        ("torch", "BoolStorage") => Dtype::BOOL,
        _ => {
            return Err(format!(
                "the pickle references {module}.{name}; only tensors (torch.save of a tensor, or of a dict of tensors) are accepted"
            ))
        }
    };
    Ok(Global::Storage(dtype))
}

fn int(v: &Value, what: &str) -> Result<i64, String> {
    match v {
        Value::Int(i) => Ok(*i),
        Value::Bool(b) => Ok(*b as i64),
        other => Err(format!("{what} must be an integer, got {}", other.kind())),
    }
}

fn dims(v: &Value, what: &str) -> Result<Vec<usize>, String> {
    let Value::Tuple(items) = v else {
        return Err(format!("{what} must be a tuple"));
    };
    items
        .items
        .iter()
        .map(|d| usize::try_from(int(d, what)?).map_err(|_| format!("{what} must be non-negative")))
        .collect()
}

/// `_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])`.
fn rebuild_tensor(args: &Value) -> Result<Value, String> {
    let Value::Tuple(a) = args else {
        return Err("_rebuild_tensor_v2 takes a tuple".into());
    };
    let [Value::Storage(storage), offset, size, stride, ..] = a.items.as_slice() else {
        return Err("_rebuild_tensor_v2 needs (storage, offset, size, stride, ...)".into());
    };
    let offset =
        usize::try_from(int(offset, "storage offset")?).map_err(|_| "negative storage offset")?;
    let (shape, strides) = (dims(size, "size")?, dims(stride, "stride")?);
    if shape.len() != strides.len() {
        return Err(format!(
            "size {shape:?} and stride {strides:?} differ in rank"
        ));
    }
    let n = numel(&shape)?;
    if n > 0 {
        // The last element the view reads must lie in the storage, and a view
        // never has more elements than its storage (no expanded views).
        let last = shape.iter().zip(&strides).try_fold(offset, |acc, (d, s)| {
            (d - 1).checked_mul(*s).and_then(|x| acc.checked_add(x))
        });
        if last.is_none_or(|l| l >= storage.numel) || n > storage.numel {
            return Err(format!(
                "a tensor of size {shape:?}, stride {strides:?} and offset {offset} does not fit its storage of {} elements (save tensor.contiguous())",
                storage.numel
            ));
        }
    }
    Ok(Value::Tensor(Rc::new(TensorRef {
        storage: storage.clone(),
        offset,
        shape,
        strides,
    })))
}

/// `('storage', StorageClass, key, location, numel)`.
fn persistent_load(pid: &Value) -> Result<Value, String> {
    let Value::Tuple(t) = pid else {
        return Err("a persistent id must be a tuple".into());
    };
    let [Value::Str(kind), Value::Global(Global::Storage(dtype)), Value::Str(key), _, numel] =
        t.items.as_slice()
    else {
        return Err(
            "a persistent id must be ('storage', <dtype>Storage, key, location, numel)".into(),
        );
    };
    if &**kind != "storage" {
        return Err(format!("unsupported persistent id kind {kind:?}"));
    }
    let numel =
        usize::try_from(int(numel, "storage numel")?).map_err(|_| "negative storage size")?;
    Ok(Value::Storage(Rc::new(StorageRef {
        dtype: *dtype,
        key: key.to_string(),
        numel,
    })))
}

struct Machine {
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
    /// MEMOIZE's next index (every MEMOIZE takes one, memoized or not).
    memoized: u32,
}

impl Machine {
    fn pop(&mut self) -> Result<Value, String> {
        self.stack
            .pop()
            .ok_or_else(|| "pickle stack underflow".to_string())
    }

    fn push(&mut self, v: Value) -> Result<(), String> {
        if self.stack.len() + self.memo.len() >= MAX_PICKLE_VALUES {
            return Err("the pickle holds too many values".into());
        }
        self.stack.push(v);
        Ok(())
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, String> {
        let at = self
            .stack
            .iter()
            .rposition(|v| matches!(v, Value::Mark))
            .ok_or("MARK not found")?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }

    /// Add `entries` to the dict on top of the stack, if no memo entry shares it.
    fn set_items(&mut self, entries: Vec<Value>) -> Result<(), String> {
        if !entries.len().is_multiple_of(2) {
            return Err("SETITEMS with an odd number of items".into());
        }
        let d = match self.stack.last_mut() {
            Some(Value::Dict(d)) => Rc::get_mut(d).ok_or("a shared dict is modified")?,
            _ => return Err("SETITEM(S) needs a dict".into()),
        };
        let mut it = entries.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            d.depth = d.depth.max(1 + k.depth().max(v.depth()));
            d.items.push((k, v));
        }
        if d.depth > MAX_PICKLE_DEPTH {
            return Err("the pickle nests too deep".into());
        }
        Ok(())
    }

    fn memo_put(&mut self, key: u32) -> Result<(), String> {
        let v = self.stack.last().ok_or("pickle stack underflow")?.clone();
        // A memoized dict is still filled in after BINPUT: keep the stack's
        // copy the only owner by memoizing dicts only once they are done
        // (torch never reads a dict back from the memo).
        if !matches!(v, Value::Dict(_)) {
            self.memo.insert(key, v);
        }
        if self.stack.len() + self.memo.len() > MAX_PICKLE_VALUES {
            return Err("the pickle holds too many values".into());
        }
        Ok(())
    }

    fn run(mut self, r: &mut Cursor<&[u8]>) -> Result<Value, String> {
        fn byte(r: &mut Cursor<&[u8]>) -> Result<u8, String> {
            let mut b = [0u8; 1];
            r.read_exact(&mut b).map_err(|_| "truncated pickle")?;
            Ok(b[0])
        }
        fn bytes<const N: usize>(r: &mut Cursor<&[u8]>) -> Result<[u8; N], String> {
            let mut b = [0u8; N];
            r.read_exact(&mut b).map_err(|_| "truncated pickle")?;
            Ok(b)
        }
        fn string(r: &mut Cursor<&[u8]>, len: usize) -> Result<Value, String> {
            let at = r.position() as usize;
            let s = r
                .get_ref()
                .get(at..at.saturating_add(len))
                .ok_or("truncated pickle")?;
            r.set_position((at + len) as u64);
            let s = std::str::from_utf8(s).map_err(|_| "a pickle string is not UTF-8")?;
            Ok(Value::Str(Rc::from(s)))
        }
        fn line(r: &mut Cursor<&[u8]>) -> Result<String, String> {
            let at = r.position() as usize;
            let rest = &r.get_ref()[at..];
            let end = rest
                .iter()
                .position(|&b| b == b'\n')
                .ok_or("truncated pickle")?;
            r.set_position((at + end + 1) as u64);
            String::from_utf8(rest[..end].to_vec()).map_err(|_| "a pickle name is not UTF-8".into())
        }
        loop {
            let op = byte(r)?;
            match op {
                0x80 => {
                    byte(r)?; // PROTO
                }
                0x95 => {
                    bytes::<8>(r)?; // FRAME
                }
                b'.' => return self.pop(),
                b'(' => self.push(Value::Mark)?,
                b'N' => self.push(Value::None)?,
                0x88 => self.push(Value::Bool(true))?,
                0x89 => self.push(Value::Bool(false))?,
                b'K' => self.push(Value::Int(byte(r)? as i64))?,
                b'M' => self.push(Value::Int(u16::from_le_bytes(bytes(r)?) as i64))?,
                b'J' => self.push(Value::Int(i32::from_le_bytes(bytes(r)?) as i64))?,
                0x8a => {
                    // LONG1: a little-endian two's-complement integer of n bytes.
                    let n = byte(r)? as usize;
                    if n > 8 {
                        return Err("an integer in the pickle is too large".into());
                    }
                    let mut b = [0u8; 8];
                    r.read_exact(&mut b[..n]).map_err(|_| "truncated pickle")?;
                    if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                        b[n..].fill(0xff);
                    }
                    self.push(Value::Int(i64::from_le_bytes(b)))?
                }
                b'X' => {
                    let len = u32::from_le_bytes(bytes(r)?) as usize;
                    let s = string(r, len)?;
                    self.push(s)?
                }
                0x8c => {
                    let len = byte(r)? as usize;
                    let s = string(r, len)?;
                    self.push(s)?
                }
                b'c' => {
                    let (module, name) = (line(r)?, line(r)?);
                    self.push(Value::Global(global(&module, &name)?))?
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(m), Value::Str(n)) = (&module, &name) else {
                        return Err("STACK_GLOBAL needs two strings".into());
                    };
                    self.push(Value::Global(global(m, n)?))?
                }
                b'q' => {
                    let k = byte(r)? as u32;
                    self.memo_put(k)?
                }
                b'r' => {
                    let k = u32::from_le_bytes(bytes(r)?);
                    self.memo_put(k)?
                }
                0x94 => {
                    let k = self.memoized;
                    self.memoized += 1;
                    self.memo_put(k)?
                }
                b'h' | b'j' => {
                    let k = if op == b'h' {
                        byte(r)? as u32
                    } else {
                        u32::from_le_bytes(bytes(r)?)
                    };
                    let v = self.memo.get(&k).cloned().ok_or_else(|| format!("memo entry {k} is not set"))?;
                    self.push(v)?
                }
                b')' => self.push(Value::tuple(Vec::new())?)?,
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Value::tuple(items)?)?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err("pickle stack underflow".into());
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.push(Value::tuple(items)?)?
                }
                b'}' => self.push(Value::empty_dict())?,
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = persistent_load(&pid)?;
                    self.push(v)?
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let v = match f {
                        Value::Global(Global::RebuildTensor) => rebuild_tensor(&args)?,
                        Value::Global(Global::OrderedDict) => Value::empty_dict(),
                        other => return Err(format!("REDUCE of {} does not build a tensor", other.kind())),
                    };
                    self.push(v)?
                }
                other => {
                    return Err(format!(
                        "unsupported pickle opcode 0x{other:02x} (only what torch.save writes for tensors is read)"
                    ))
                }
            }
        }
    }
}

fn read_torch(bytes: &[u8]) -> Result<Tensors, String> {
    let mut zip =
        zip::ZipArchive::new(Cursor::new(bytes)).map_err(|e| format!("not a valid zip: {e}"))?;
    let pkl = zip
        .file_names()
        .filter_map(Result::ok)
        .find(|n| n.ends_with("/data.pkl") || *n == "data.pkl")
        .map(|n| n.into_owned())
        .ok_or("it has no data.pkl")?;
    let prefix = pkl.strip_suffix("data.pkl").unwrap_or_default().to_owned();
    let mut read_entry = |name: &str, max: u64| -> Result<Vec<u8>, String> {
        let mut f = zip.by_name(name).map_err(|e| match e {
            zip::result::ZipError::FileNotFound => format!("it has no entry {name:?}"),
            e => format!("entry {name:?}: {e}"),
        })?;
        // torch.save stores entries uncompressed; refusing compression
        // leaves zip bombs nothing to inflate.
        if f.compression() != zip::CompressionMethod::Stored {
            return Err(format!(
                "entry {name:?} is compressed (torch.save writes them stored)"
            ));
        }
        if f.size() > max {
            return Err(format!(
                "entry {name:?} has {} bytes, more than the {max} expected",
                f.size()
            ));
        }
        let mut out = Vec::with_capacity(f.size() as usize);
        f.by_ref()
            .take(max)
            .read_to_end(&mut out)
            .map_err(|e| format!("entry {name:?}: {e}"))?;
        Ok(out)
    };
    let pickle = read_entry(&pkl, MAX_PICKLE_BYTES)?;
    let machine = Machine {
        stack: Vec::new(),
        memo: HashMap::new(),
        memoized: 0,
    };
    let root = machine.run(&mut Cursor::new(pickle.as_slice()))?;
    let named: Vec<(Option<String>, Rc<TensorRef>)> = match root {
        Value::Tensor(t) => vec![(None, t)],
        Value::Dict(d) => d
            .items
            .iter()
            .map(|(k, v)| match (k, v) {
                (Value::Str(k), Value::Tensor(t)) => Ok((Some(k.to_string()), t.clone())),
                _ => Err("a saved dict must map names to tensors".to_string()),
            })
            .collect::<Result<_, _>>()?,
        other => {
            return Err(format!(
                "it holds {}, not a tensor or a dict of tensors",
                other.kind()
            ))
        }
    };
    let mut storages: HashMap<String, Rc<Vec<u8>>> = HashMap::new();
    let mut out = Vec::with_capacity(named.len());
    for (name, t) in named {
        let s = &t.storage;
        let size = elem_size(s.dtype);
        let data = match storages.get(&s.key) {
            Some(d) => d.clone(),
            None => {
                let want = s.numel.checked_mul(size).ok_or("storage too large")?;
                let d = read_entry(&format!("{prefix}data/{}", s.key), want as u64)?;
                if d.len() != want {
                    return Err(format!(
                        "storage {:?} has {} bytes, its {} elements need {want}",
                        s.key,
                        d.len(),
                        s.numel
                    ));
                }
                let d = Rc::new(d);
                storages.insert(s.key.clone(), d.clone());
                d
            }
        };
        let data = gather(&data, size, &t.shape, &t.strides, t.offset);
        out.push((
            name,
            RawTensor {
                dtype: s.dtype,
                shape: t.shape.clone(),
                data,
            },
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(descr: &str, fortran: bool, shape: &str, data: &[u8]) -> Vec<u8> {
        let mut h = format!(
            "{{'descr': '{descr}', 'fortran_order': {}, 'shape': {shape}, }}",
            if fortran { "True" } else { "False" }
        );
        while (10 + h.len() + 1) % 64 != 0 {
            h.push(' ');
        }
        h.push('\n');
        let mut out = NPY_MAGIC.to_vec();
        out.extend([1, 0]);
        out.extend((h.len() as u16).to_le_bytes());
        out.extend(h.as_bytes());
        out.extend(data);
        out
    }

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn npy_c_fortran_and_big_endian() {
        let t = read_npy(&npy(
            "<f4",
            false,
            "(2, 3)",
            &f32s(&[1., 2., 3., 4., 5., 6.]),
        ))
        .unwrap();
        assert_eq!((t.dtype, t.shape.clone()), (Dtype::F32, vec![2, 3]));
        assert_eq!(t.data, f32s(&[1., 2., 3., 4., 5., 6.]));
        // Column-major storage of [[1, 2, 3], [4, 5, 6]].
        let t = read_npy(&npy(
            "<f4",
            true,
            "(2, 3)",
            &f32s(&[1., 4., 2., 5., 3., 6.]),
        ))
        .unwrap();
        assert_eq!(t.data, f32s(&[1., 2., 3., 4., 5., 6.]));
        let be: Vec<u8> = [1i64, 6, 8].iter().flat_map(|x| x.to_be_bytes()).collect();
        let t = read_npy(&npy(">i8", false, "(3,)", &be)).unwrap();
        assert_eq!(
            t.data,
            [1i64, 6, 8]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect::<Vec<_>>()
        );
        let e =
            read_tensors(&npy("<f4", false, "(2, 3)", &f32s(&[1.])), "image_embeds").unwrap_err();
        assert!(e.message().contains("needs 24 bytes"), "{}", e.message());
        let e = read_tensors(&npy("<c8", false, "(1,)", &[0; 8]), "image_embeds").unwrap_err();
        assert!(e.message().contains("unsupported dtype"), "{}", e.message());
    }

    /// A pickle as torch.save writes it for a 2x2 f32 tensor, with `extra`
    /// opcodes spliced in before REDUCE's callable.
    fn tensor_pickle(global: &str, numel: u8, size: [u8; 2], stride: [u8; 2]) -> Vec<u8> {
        let mut p = vec![0x80, 2];
        p.extend(format!("c{global}\n").as_bytes());
        p.extend(b"((X\x07\x00\x00\x00storage");
        p.extend(b"ctorch\nFloatStorage\n");
        p.extend(b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpu");
        p.extend([
            b'K', numel, b't', b'Q', b'K', 0, b'K', size[0], b'K', size[1], 0x86,
        ]);
        p.extend([b'K', stride[0], b'K', stride[1], 0x86, 0x89]);
        p.extend(b"ccollections\nOrderedDict\n)Rt");
        p.extend(b"R.");
        p
    }

    fn archive(pickle: &[u8], storage: &[u8], method: zip::CompressionMethod) -> Vec<u8> {
        use std::io::Write;
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let o = zip::write::SimpleFileOptions::default().compression_method(method);
        w.start_file("archive/data.pkl", o).unwrap();
        w.write_all(pickle).unwrap();
        w.start_file("archive/data/0", o).unwrap();
        w.write_all(storage).unwrap();
        w.finish().unwrap().into_inner()
    }

    #[test]
    fn torch_tensor_and_transposed_view() {
        let stored = zip::CompressionMethod::Stored;
        let z = archive(
            &tensor_pickle("torch._utils\n_rebuild_tensor_v2", 4, [2, 2], [2, 1]),
            &f32s(&[1., 2., 3., 4.]),
            stored,
        );
        let t = read_tensors(&z, "image_embeds").unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].1.data, f32s(&[1., 2., 3., 4.]));
        // stride (1, 2): the transpose.
        let z = archive(
            &tensor_pickle("torch._utils\n_rebuild_tensor_v2", 4, [2, 2], [1, 2]),
            &f32s(&[1., 2., 3., 4.]),
            stored,
        );
        assert_eq!(
            read_tensors(&z, "x").unwrap()[0].1.data,
            f32s(&[1., 3., 2., 4.])
        );
    }

    #[test]
    fn hostile_archives_are_refused() {
        let stored = zip::CompressionMethod::Stored;
        let msg = |z: &[u8]| {
            read_tensors(z, "image_embeds")
                .unwrap_err()
                .message()
                .to_string()
        };
        let m = msg(&archive(
            &tensor_pickle("os\nsystem", 4, [2, 2], [2, 1]),
            &f32s(&[0.; 4]),
            stored,
        ));
        assert!(
            m.contains("references os.system") && m.contains("only tensors"),
            "{m}"
        );
        // A view past its storage, and a storage entry shorter than it claims.
        let m = msg(&archive(
            &tensor_pickle("torch._utils\n_rebuild_tensor_v2", 4, [2, 2], [3, 1]),
            &f32s(&[0.; 4]),
            stored,
        ));
        assert!(m.contains("does not fit its storage"), "{m}");
        let m = msg(&archive(
            &tensor_pickle("torch._utils\n_rebuild_tensor_v2", 4, [2, 2], [2, 1]),
            &f32s(&[0.; 3]),
            stored,
        ));
        assert!(m.contains("need 16"), "{m}");
        let m = msg(&archive(
            &tensor_pickle("torch._utils\n_rebuild_tensor_v2", 200, [10, 20], [20, 1]),
            &f32s(&[0.; 400]),
            stored,
        ));
        assert!(m.contains("more than the 800 expected"), "{m}");
        // Memo references are shared, never copied, and never printed: a
        // pickle that doubles a value 5000 times stops at the depth limit.
        let mut p = vec![0x80, 2, b'N', b'q', 0];
        for _ in 0..5000 {
            p.extend([b'h', 0, b'h', 0, 0x86, b'q', 0]);
        }
        p.push(b'.');
        let m = msg(&archive(&p, &[], stored));
        assert!(m.contains("nests too deep"), "{m}");
        let mut p = vec![0x80, 2, b')', b'q', 0];
        for i in 0..5000u32 {
            p.extend([b'(', b'h', 0, b'h', 0, b't', b'r']);
            p.extend((i + 1).to_le_bytes());
        }
        p.push(b'.');
        assert!(msg(&archive(&p, &[], stored)).contains("too many values"));
        // A compressed entry (method 8 patched into both headers) is refused
        // before anything is inflated.
        let mut z = archive(
            &tensor_pickle("torch._utils\n_rebuild_tensor_v2", 4, [2, 2], [2, 1]),
            &f32s(&[0.; 4]),
            stored,
        );
        for at in 0..z.len() - 4 {
            match &z[at..at + 4] {
                b"PK\x03\x04" => z[at + 8] = 8,
                b"PK\x01\x02" => z[at + 10] = 8,
                _ => {}
            }
        }
        let m = msg(&z);
        assert!(m.contains("compress") || m.contains("nsupported"), "{m}");
        let m = msg(b"PK\x03\x04garbage");
        assert!(m.contains("not a valid zip"), "{m}");
        let m = msg(b"\x80\x02legacy");
        assert!(m.contains("legacy"), "{m}");
    }
}
