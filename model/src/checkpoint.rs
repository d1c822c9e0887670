//! Reads PyTorch `.pth` checkpoints natively, so the published DiG weights can
//! be used without a Python installation.
//!
//! A `torch.save` file is a zip archive: `<archive>/data.pkl` is a pickle
//! (protocol 2) describing the object tree, in which every tensor refers by a
//! persistent id to a raw little-endian storage `<archive>/data/<key>`. This
//! module runs a small pickle virtual machine that understands exactly the
//! opcodes and globals `torch.save` emits for a dict of tensors; anything else
//! is either kept as an opaque value (harmless non-tensor entries such as
//! training arguments) or rejected with a message naming the file.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::{ModelError, Result};

/// Reads every tensor of a torch.save checkpoint. Accepts a flat dict of tensors, or
/// one nested under "state_dict" (or "model"); strips a leading "module." from keys (DataParallel).
/// Non-tensor entries (e.g. "step") are ignored. Returns (key, tensor) sorted by key, on CPU,
/// with the stored dtype (float32 typically), honouring storage offset, shape and strides.
pub fn read_torch_checkpoint(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let fail = |msg: String| ModelError::format(path, msg);
    let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| {
        fail(format!(
            "not a PyTorch checkpoint (expected a zip archive written by torch.save; \
             files from PyTorch < 1.6 must be re-saved with a current torch.save): {e}"
        ))
    })?;

    // torch.save names the top folder after the file it first wrote, so find it
    // from `data.pkl` instead of guessing.
    let prefix = zip
        .file_names()
        .filter_map(|n| n.strip_suffix("data.pkl"))
        .find(|p| p.is_empty() || (p.ends_with('/') && p.matches('/').count() == 1))
        .map(str::to_owned)
        .ok_or_else(|| fail("zip archive has no data.pkl; not written by torch.save".into()))?;
    let mut read_entry = |name: &str| -> Result<Option<Vec<u8>>> {
        let mut entry = match zip.by_name(name) {
            Ok(entry) => entry,
            Err(zip::result::ZipError::FileNotFound) => return Ok(None),
            Err(e) => return Err(fail(format!("cannot read {name} in the archive: {e}"))),
        };
        let mut bytes = Vec::with_capacity(entry.size() as usize);
        entry
            .read_to_end(&mut bytes)
            .map_err(|e| fail(format!("cannot read {name} in the archive: {e}")))?;
        Ok(Some(bytes))
    };

    // Storages are copied byte for byte, which is only right on a little-endian
    // layout; an absent `byteorder` entry means little-endian (older writers).
    if let Some(order) = read_entry(&format!("{prefix}byteorder"))? {
        if order.trim_ascii() != b"little" {
            return Err(fail(
                "checkpoint was saved on a big-endian machine; not supported".into(),
            ));
        }
    }
    let pickle = read_entry(&format!("{prefix}data.pkl"))?.unwrap_or_default();
    let root = Unpickler::new(&pickle)
        .run()
        .map_err(|e| fail(format!("data.pkl: {e}")))?;

    let mut storages: HashMap<String, Tensor> = HashMap::new();
    let mut out = Vec::new();
    for (key, value) in state_dict(root) {
        let (Value::Str(key), Value::Tensor(t)) = (key, value) else {
            continue;
        };
        let key = key
            .strip_prefix("module.")
            .map(str::to_owned)
            .unwrap_or(key);
        if !storages.contains_key(&t.storage.key) {
            let s = &t.storage;
            let name = format!("{prefix}data/{}", s.key);
            let bytes = read_entry(&name)?
                .ok_or_else(|| fail(format!("storage {name} of tensor {key} is missing")))?;
            let len = s.numel as usize * s.kind.elt_size_in_bytes();
            if bytes.len() < len {
                return Err(fail(format!(
                    "storage {name} has {} bytes, expected {len} ({} x {:?})",
                    bytes.len(),
                    s.numel,
                    s.kind
                )));
            }
            // from_data_size copies the bytes, so the zip buffer can be dropped.
            let flat = Tensor::f_from_data_size(&bytes[..len], &[s.numel], s.kind)?;
            storages.insert(s.key.clone(), flat);
        }
        let tensor = t
            .materialize(&storages[&t.storage.key])
            .map_err(|e| fail(format!("tensor {key}: {e}")))?;
        out.push((key, tensor));
    }
    if out.is_empty() {
        return Err(fail(
            "checkpoint contains no tensors (expected a dict of tensors, \
             possibly under \"state_dict\" or \"model\")"
                .into(),
        ));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some(w) = out.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(fail(format!(
            "key {} appears twice (with and without \"module.\")",
            w[0].0
        )));
    }
    Ok(out)
}

/// The entries holding the weights: the dict under "state_dict" or "model" when
/// there is one (training checkpoints also carry step counters etc.), else the root.
fn state_dict(root: Value) -> Vec<(Value, Value)> {
    let Value::Dict(mut items) = root else {
        return Vec::new();
    };
    for wanted in ["state_dict", "model"] {
        let nested = items
            .iter()
            .position(|(k, v)| matches!((k, v), (Value::Str(k), Value::Dict(_)) if k == wanted));
        if let Some(i) = nested {
            if let (_, Value::Dict(inner)) = items.swap_remove(i) {
                return inner;
            }
        }
    }
    items
}

/// A storage named by a persistent id: `('storage', torch.XStorage, key, location, numel)`.
#[derive(Clone, Debug)]
struct StorageRef {
    kind: Kind,
    key: String,
    numel: i64,
}

/// The arguments of `torch._utils._rebuild_tensor_v2`; the data is read later so
/// that each storage is loaded once even when several tensors view it.
#[derive(Clone, Debug)]
struct TensorRef {
    storage: StorageRef,
    offset: i64,
    size: Vec<i64>,
    stride: Vec<i64>,
}

impl TensorRef {
    fn materialize(&self, storage: &Tensor) -> std::result::Result<Tensor, String> {
        if self.size.len() != self.stride.len() || self.offset < 0 {
            return Err(format!(
                "bad layout: size {:?}, stride {:?}",
                self.size, self.stride
            ));
        }
        // as_strided trusts its arguments for reads, so check the view stays inside the storage.
        if self.size.iter().all(|&n| n > 0) {
            let last = self
                .size
                .iter()
                .zip(&self.stride)
                .map(|(n, s)| (n - 1) * s)
                .sum::<i64>()
                + self.offset;
            if self.stride.iter().any(|&s| s < 0) || last >= self.storage.numel {
                return Err(format!(
                    "view (offset {}, size {:?}, stride {:?}) exceeds its storage of {} elements",
                    self.offset, self.size, self.stride, self.storage.numel
                ));
            }
        }
        let view = storage
            .f_as_strided(&self.size, &self.stride, self.offset)
            .map_err(|e| e.to_string())?;
        // Copy into a fresh contiguous tensor so a small slice does not pin its
        // whole storage and the result is independent of other views.
        let mut out = Tensor::f_empty(&self.size, (self.storage.kind, Device::Cpu))
            .map_err(|e| e.to_string())?;
        out.f_copy_(&view).map_err(|e| e.to_string())?;
        Ok(out)
    }
}

/// The pickle values a torch checkpoint can contain. Objects of classes this
/// reader does not know become `Opaque` so that they can be skipped.
// Some payloads (bool, float, class name) are only ever shown through `Debug`
// in error messages, which dead-code analysis does not count as a use.
#[allow(dead_code)]
#[derive(Clone, Debug)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    /// A `module.name` reference produced by GLOBAL.
    Global(String),
    Storage(StorageRef),
    Tensor(TensorRef),
    Opaque(String),
}

impl Value {
    fn int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }
    fn ints(&self) -> Option<Vec<i64>> {
        match self {
            Value::Tuple(items) | Value::List(items) => items.iter().map(Value::int).collect(),
            _ => None,
        }
    }
}

type VmResult<T> = std::result::Result<T, String>;

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    // Values are copied out of the memo; torch only re-uses immutable things
    // (globals, storages, tuples) this way, so copies behave like references.
    memo: HashMap<u32, Value>,
}

impl<'a> Unpickler<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self {
            data,
            pos: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
        }
    }

    fn take(&mut self, n: usize) -> VmResult<&'a [u8]> {
        let bytes = self
            .data
            .get(self.pos..self.pos + n)
            .ok_or("truncated pickle")?;
        self.pos += n;
        Ok(bytes)
    }
    fn u8(&mut self) -> VmResult<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> VmResult<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn string(&mut self, n: usize) -> VmResult<String> {
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| "invalid UTF-8 in string".into())
    }
    fn line(&mut self) -> VmResult<String> {
        let len = self.data[self.pos..]
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("truncated pickle")?;
        let s = self.string(len)?;
        self.pos += 1;
        Ok(s)
    }
    fn pop(&mut self) -> VmResult<Value> {
        self.stack.pop().ok_or_else(|| "stack underflow".into())
    }
    fn top(&mut self) -> VmResult<&mut Value> {
        self.stack
            .last_mut()
            .ok_or_else(|| "stack underflow".into())
    }
    /// Pops everything above the most recent MARK.
    fn pop_mark(&mut self) -> VmResult<Vec<Value>> {
        let mark = self.marks.pop().ok_or("MARK missing")?;
        if mark > self.stack.len() {
            return Err("MARK above stack top".into());
        }
        Ok(self.stack.split_off(mark))
    }
    fn put(&mut self, id: u32) -> VmResult<()> {
        let v = self.top()?.clone();
        self.memo.insert(id, v);
        Ok(())
    }
    fn get(&mut self, id: u32) -> VmResult<()> {
        let v = self
            .memo
            .get(&id)
            .ok_or_else(|| format!("memo entry {id} missing"))?
            .clone();
        self.stack.push(v);
        Ok(())
    }

    fn run(mut self) -> VmResult<Value> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            let value = match op {
                0x80 => {
                    let proto = self.u8()?;
                    if proto > 5 {
                        return Err(format!("pickle protocol {proto} is not supported"));
                    }
                    continue;
                }
                0x95 => {
                    self.take(8)?; // FRAME: only a read-ahead hint
                    continue;
                }
                b'.' => return self.pop(),
                b'(' => {
                    self.marks.push(self.stack.len());
                    continue;
                }
                b'}' => Value::Dict(Vec::new()),
                b']' => Value::List(Vec::new()),
                b')' => Value::Tuple(Vec::new()),
                b'N' => Value::None,
                0x88 => Value::Bool(true),
                0x89 => Value::Bool(false),
                b'J' => Value::Int(self.u32()? as i32 as i64),
                b'K' => Value::Int(self.u8()? as i64),
                b'M' => Value::Int(u16::from_le_bytes(self.take(2)?.try_into().unwrap()) as i64),
                0x8a => {
                    let n = self.u8()? as usize;
                    let bytes = self.take(n)?;
                    if n > 8 {
                        return Err(format!("integer of {n} bytes is too large"));
                    }
                    // Little-endian two's complement: sign-extend from the top byte.
                    let fill = if bytes.last().is_some_and(|&b| b >= 0x80) {
                        0xff
                    } else {
                        0
                    };
                    let mut buf = [fill; 8];
                    buf[..n].copy_from_slice(bytes);
                    Value::Int(i64::from_le_bytes(buf))
                }
                b'G' => Value::Float(f64::from_be_bytes(self.take(8)?.try_into().unwrap())),
                b'X' => {
                    let n = self.u32()? as usize;
                    Value::Str(self.string(n)?)
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    Value::Str(self.string(n)?)
                }
                b'c' => {
                    let module = self.line()?;
                    Value::Global(format!("{module}.{}", self.line()?))
                }
                0x93 => match (self.pop()?, self.pop()?) {
                    (Value::Str(name), Value::Str(module)) => {
                        Value::Global(format!("{module}.{name}"))
                    }
                    _ => return Err("STACK_GLOBAL needs two strings".into()),
                },
                b'q' => {
                    let id = self.u8()? as u32;
                    self.put(id)?;
                    continue;
                }
                b'r' => {
                    let id = self.u32()?;
                    self.put(id)?;
                    continue;
                }
                0x94 => {
                    self.put(self.memo.len() as u32)?;
                    continue;
                }
                b'h' => {
                    let id = self.u8()? as u32;
                    self.get(id)?;
                    continue;
                }
                b'j' => {
                    let id = self.u32()?;
                    self.get(id)?;
                    continue;
                }
                b't' => Value::Tuple(self.pop_mark()?),
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err("stack underflow".into());
                    }
                    Value::Tuple(self.stack.split_off(self.stack.len() - n))
                }
                b'Q' => persistent_load(self.pop()?)?,
                b'R' => {
                    let args = self.pop()?;
                    call(self.pop()?, args)?
                }
                0x81 => {
                    self.pop()?; // NEWOBJ: constructor args are irrelevant for opaque objects
                    match self.pop()? {
                        Value::Global(name) => Value::Opaque(name),
                        other => return Err(format!("NEWOBJ on {other:?}")),
                    }
                }
                b'b' => {
                    // BUILD sets attributes (`__setstate__`); nothing a tensor or dict needs here.
                    self.pop()?;
                    continue;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    insert(self.top()?, vec![k, v])?;
                    continue;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    insert(self.top()?, items)?;
                    continue;
                }
                b'a' | b'e' => {
                    let items = if op == b'a' {
                        vec![self.pop()?]
                    } else {
                        self.pop_mark()?
                    };
                    match self.top()? {
                        Value::List(list) => list.extend(items),
                        Value::Opaque(_) => {}
                        other => return Err(format!("APPEND to {other:?}")),
                    }
                    continue;
                }
                _ => {
                    return Err(format!(
                        "unsupported pickle opcode 0x{op:02x} ({:?}) at byte {at}; \
                         only the subset torch.save writes is understood",
                        op as char
                    ))
                }
            };
            self.stack.push(value);
        }
    }
}

/// SETITEM(S): key/value pairs into a dict; unknown objects just swallow them.
fn insert(target: &mut Value, items: Vec<Value>) -> VmResult<()> {
    match target {
        Value::Dict(dict) => {
            let mut it = items.into_iter();
            while let Some(k) = it.next() {
                let v = it.next().ok_or("SETITEMS with an odd number of items")?;
                dict.push((k, v));
            }
            Ok(())
        }
        Value::Opaque(_) => Ok(()),
        other => Err(format!("SETITEM on {other:?}")),
    }
}

/// BINPERSID: torch's persistent id for a storage.
fn persistent_load(pid: Value) -> VmResult<Value> {
    let bad = || format!("unsupported persistent id {pid:?}");
    let Value::Tuple(items) = &pid else {
        return Err(bad());
    };
    let [Value::Str(tag), Value::Global(class), Value::Str(key), _location, Value::Int(numel)] =
        items.as_slice()
    else {
        return Err(bad());
    };
    if tag != "storage" || *numel < 0 {
        return Err(bad());
    }
    let kind = match class.rsplit('.').next().unwrap_or_default() {
        "FloatStorage" => Kind::Float,
        "DoubleStorage" => Kind::Double,
        "HalfStorage" => Kind::Half,
        "BFloat16Storage" => Kind::BFloat16,
        "LongStorage" => Kind::Int64,
        "IntStorage" => Kind::Int,
        "ShortStorage" => Kind::Int16,
        "CharStorage" => Kind::Int8,
        "ByteStorage" | "UntypedStorage" => Kind::Uint8,
        "BoolStorage" => Kind::Bool,
        other => return Err(format!("unsupported storage type {other}")),
    };
    Ok(Value::Storage(StorageRef {
        kind,
        key: key.clone(),
        numel: *numel,
    }))
}

/// REDUCE: the few callables torch.save uses to rebuild a state dict.
fn call(func: Value, args: Value) -> VmResult<Value> {
    let Value::Global(name) = func else {
        return Err(format!("REDUCE on non-callable {func:?}"));
    };
    let Value::Tuple(args) = args else {
        return Err(format!("REDUCE {name} with non-tuple arguments"));
    };
    match name.as_str() {
        // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
        "torch._utils._rebuild_tensor_v2" => match args.as_slice() {
            [Value::Storage(storage), offset, size, stride, ..] => Ok(Value::Tensor(TensorRef {
                storage: storage.clone(),
                offset: offset.int().ok_or("tensor offset is not an integer")?,
                size: size
                    .ints()
                    .ok_or("tensor size is not a tuple of integers")?,
                stride: stride
                    .ints()
                    .ok_or("tensor stride is not a tuple of integers")?,
            })),
            _ => Err(format!("unexpected arguments to {name}: {args:?}")),
        },
        // An nn.Parameter wraps the tensor; requires_grad is irrelevant for inference.
        "torch._utils._rebuild_parameter" | "torch._utils._rebuild_parameter_with_state" => {
            match args.into_iter().next() {
                Some(t @ Value::Tensor(_)) => Ok(t),
                _ => Err(format!("{name} without a tensor")),
            }
        }
        "collections.OrderedDict" => Ok(Value::Dict(Vec::new())),
        _ => Ok(Value::Opaque(name)),
    }
}
