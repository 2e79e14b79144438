//! The Open Inference Protocol v2 (KServe / Triton HTTP/REST) codec for inference requests and
//! responses, with Triton's binary tensor data extension.
//!
//! Bytes in, [`HostTensor`]s out, and back: no server state, no HTTP framework, no libtorch.
//! The body is hostile. Its JSON is parsed into small structs in which each input's `data` stays
//! a borrowed raw slice; the shape is then checked, with checked arithmetic, against the
//! per-tensor byte limit, and only then is `data` streamed straight into the little-endian
//! buffer. Tensor data never becomes a `serde_json::Value` (tens of bytes per number).
//!
//! Binary extension: with `Inference-Header-Content-Length: n`, the body's first `n` bytes are
//! the JSON and each input with `parameters.binary_data_size` takes the next bytes, in input
//! order; a response appends the outputs sent as binary the same way. Every [`OipError`] is the
//! client's fault (HTTP 400).
use crate::runtime::{DType, HostTensor};
use serde::de::{self, Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde::ser::{self, SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::fmt;
use std::marker::PhantomData;

/// Most inputs one request may carry, and most outputs it may name.
pub const MAX_TENSORS: usize = 64;
/// Longest tensor name, and longest request id (echoed back), in bytes.
pub const MAX_NAME_BYTES: usize = 256;
/// Most dimensions a tensor may have (as [`HostTensor::new`] allows).
pub const MAX_DIMS: usize = 8;
/// Deepest array nesting accepted in JSON `data`: one level per dimension, and one spare.
const MAX_NESTING: usize = MAX_DIMS + 1;

/// A decoded inference request.
#[derive(Debug, Clone, PartialEq)]
pub struct InferRequest {
    /// The request's `id`, to echo in the response.
    pub id: Option<String>,
    /// The input tensors, in request order, names unique.
    pub inputs: Vec<HostTensor>,
    /// The outputs asked for, names unique; empty means all of them.
    pub outputs: Vec<RequestedOutput>,
    /// Request-level `parameters.binary_data_output`: outputs go as binary unless overridden.
    pub binary_output: bool,
}

/// One entry of the request's `outputs`.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestedOutput {
    /// The output's name.
    pub name: String,
    /// Per-output `parameters.binary_data` (`None`: the request's default).
    pub binary: Option<bool>,
}

/// An encoded inference response.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedResponse {
    /// The JSON, followed by the binary outputs if any.
    pub body: Vec<u8>,
    /// `Some(n)`: send `Inference-Header-Content-Length: n` and content type
    /// `application/octet-stream`; `None`: the body is only JSON (`application/json`).
    pub header_len: Option<usize>,
}

/// Why a request could not be decoded or a response encoded; every variant is a client error.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OipError {
    /// The JSON is not JSON, or not an inference request.
    #[error("invalid inference request JSON: {0}")]
    Json(String),
    /// The request as a whole is malformed: header length past the body, bytes left after the
    /// binary inputs, inputs missing, too many, or badly or twice named.
    #[error("{0}")]
    Request(String),
    /// One input is malformed: its datatype, shape, JSON data or binary data.
    #[error("input '{input}': {message}")]
    Input { input: String, message: String },
    /// An input's shape holds more bytes than the per-tensor limit (or than 64 bits count).
    #[error("input '{input}': shape {shape:?} of {datatype} is larger than the {max}-byte limit")]
    TooLarge {
        input: String,
        shape: Vec<i64>,
        datatype: &'static str,
        max: usize,
    },
    /// A protocol extension Tessera does not implement (shared memory, classification).
    #[error("{0} is not supported")]
    Unsupported(String),
    /// A requested output the model does not produce.
    #[error("unknown output '{name}': the model's outputs are {known:?}")]
    UnknownOutput { name: String, known: Vec<String> },
    /// An output asked for as JSON holds NaN or infinity, which JSON cannot carry.
    #[error("{0}")]
    NotJson(String),
}

/// The OIP name of a datatype.
pub fn datatype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "FP32",
        DType::F64 => "FP64",
        DType::F16 => "FP16",
        DType::BF16 => "BF16",
        DType::I64 => "INT64",
        DType::I32 => "INT32",
        DType::I16 => "INT16",
        DType::I8 => "INT8",
        DType::U8 => "UINT8",
        DType::Bool => "BOOL",
    }
}

/// The datatype an OIP name stands for; `None` for those Tessera lacks (`BYTES`, `UINT16`...).
pub fn parse_datatype(s: &str) -> Option<DType> {
    Some(match s {
        "FP32" => DType::F32,
        "FP64" => DType::F64,
        "FP16" => DType::F16,
        "BF16" => DType::BF16,
        "INT64" => DType::I64,
        "INT32" => DType::I32,
        "INT16" => DType::I16,
        "INT8" => DType::I8,
        "UINT8" => DType::U8,
        "BOOL" => DType::Bool,
        _ => return None,
    })
}

// The request JSON. Unknown fields and parameters (model_name, priority, timeout...) are ignored.
#[derive(Deserialize)]
struct RequestJson<'a> {
    id: Option<String>,
    #[serde(borrow)]
    inputs: Bounded<InputJson<'a>, MAX_TENSORS>,
    outputs: Option<Bounded<OutputJson, MAX_TENSORS>>,
    parameters: Option<RequestParams>,
}

#[derive(Deserialize)]
struct RequestParams {
    binary_data_output: Option<bool>,
}

#[derive(Deserialize)]
struct InputJson<'a> {
    name: String,
    shape: Bounded<i64, 64>,
    datatype: String,
    #[serde(default)]
    parameters: InputParams,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize, Default)]
struct InputParams {
    binary_data_size: Option<u64>,
    shared_memory_region: Option<IgnoredAny>,
}

#[derive(Deserialize)]
struct OutputJson {
    name: String,
    #[serde(default)]
    parameters: OutputParams,
}

#[derive(Deserialize, Default)]
struct OutputParams {
    binary_data: Option<bool>,
    classification: Option<IgnoredAny>,
    shared_memory_region: Option<IgnoredAny>,
}

/// Decodes an inference request. `header_len` is the `Inference-Header-Content-Length` header,
/// if present. Each input may hold at most `max_tensor_bytes`, checked before allocating.
pub fn parse_infer(
    body: &[u8],
    header_len: Option<usize>,
    max_tensor_bytes: usize,
) -> Result<InferRequest, OipError> {
    let request = |m: String| Err(OipError::Request(m));
    let json_len = header_len.unwrap_or(body.len());
    if json_len > body.len() {
        return request(format!(
            "Inference-Header-Content-Length is {json_len} but the body has {} bytes",
            body.len()
        ));
    }
    let (head, mut binary) = body.split_at(json_len);
    let head = std::str::from_utf8(head).map_err(|e| OipError::Json(e.to_string()))?;
    let req: RequestJson = serde_json::from_str(head).map_err(|e| OipError::Json(e.to_string()))?;
    if req.id.as_ref().is_some_and(|id| id.len() > MAX_NAME_BYTES) {
        return request(format!("id is longer than {MAX_NAME_BYTES} bytes"));
    }
    if req.inputs.0.is_empty() {
        return request("a request needs at least one input".into());
    }
    let mut inputs: Vec<HostTensor> = Vec::with_capacity(req.inputs.0.len());
    for input in req.inputs.0 {
        check_name("input", &input.name)?;
        if inputs.iter().any(|t| t.name == input.name) {
            return request(format!("input '{}' is given twice", input.name));
        }
        let has_header = header_len.is_some();
        inputs.push(decode_input(
            input,
            has_header,
            &mut binary,
            max_tensor_bytes,
        )?);
    }
    if !binary.is_empty() {
        return request(format!(
            "{} bytes follow the last input's binary data",
            binary.len()
        ));
    }
    let mut outputs: Vec<RequestedOutput> = Vec::new();
    for out in req.outputs.map(|o| o.0).unwrap_or_default() {
        check_name("output", &out.name)?;
        if outputs.iter().any(|o| o.name == out.name) {
            return request(format!("output '{}' is requested twice", out.name));
        }
        let p = out.parameters;
        if p.classification.is_some() || p.shared_memory_region.is_some() {
            let m = format!(
                "output '{}': the classification or shared-memory extension",
                out.name
            );
            return Err(OipError::Unsupported(m));
        }
        outputs.push(RequestedOutput {
            name: out.name,
            binary: p.binary_data,
        });
    }
    let binary_output = req
        .parameters
        .and_then(|p| p.binary_data_output)
        .unwrap_or(false);
    Ok(InferRequest {
        id: req.id,
        inputs,
        outputs,
        binary_output,
    })
}

fn check_name(what: &str, name: &str) -> Result<(), OipError> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        let n = name.len();
        let m = format!("{what} name must be 1 to {MAX_NAME_BYTES} bytes, got {n}");
        return Err(OipError::Request(m));
    }
    Ok(())
}

/// Checks one input's datatype and shape, then takes its data from JSON or the binary section.
fn decode_input(
    input: InputJson,
    has_header: bool,
    binary: &mut &[u8],
    max_tensor_bytes: usize,
) -> Result<HostTensor, OipError> {
    let name = input.name;
    let bad = |message: String| OipError::Input {
        input: name.clone(),
        message,
    };
    let Some(dtype) = parse_datatype(&input.datatype) else {
        return Err(bad(format!(
            "datatype {} is not supported: use FP32, FP64, FP16, BF16, INT64, INT32, INT16, \
             INT8, UINT8 or BOOL",
            input.datatype
        )));
    };
    if input.parameters.shared_memory_region.is_some() {
        let m = format!("input '{name}': the shared-memory extension");
        return Err(OipError::Unsupported(m));
    }
    let dims = input.shape.0;
    if dims.len() > MAX_DIMS {
        return Err(bad(format!(
            "shape has {} dimensions, more than {MAX_DIMS}",
            dims.len()
        )));
    }
    let Ok(shape) = dims
        .iter()
        .map(|&d| u64::try_from(d))
        .collect::<Result<Vec<_>, _>>()
    else {
        return Err(bad(format!("shape {dims:?} has a negative dimension")));
    };
    let numel = shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d));
    let bytes = numel.and_then(|n| n.checked_mul(dtype.size() as u64));
    let (Some(numel), Some(bytes)) = (numel, bytes.filter(|&b| b <= max_tensor_bytes as u64))
    else {
        let (datatype, max) = (datatype_name(dtype), max_tensor_bytes);
        return Err(OipError::TooLarge {
            input: name,
            shape: dims,
            datatype,
            max,
        });
    };
    let data = match (input.data, input.parameters.binary_data_size) {
        (Some(_), Some(_)) => Err("has both data and parameters.binary_data_size".into()),
        (None, None) => Err("has no data: give data or parameters.binary_data_size".into()),
        (Some(raw), None) => json_data(dtype, raw, numel),
        (None, Some(_)) if !has_header => {
            Err("binary_data_size needs the Inference-Header-Content-Length header".into())
        }
        (None, Some(k)) if k != bytes => {
            let dt = datatype_name(dtype);
            Err(format!(
                "binary_data_size is {k} but shape {dims:?} of {dt} takes {bytes} bytes"
            ))
        }
        (None, Some(k)) if k > binary.len() as u64 => {
            let left = binary.len();
            Err(format!(
                "binary_data_size {k} runs past the end of the body ({left} bytes left)"
            ))
        }
        (None, Some(k)) => {
            let (data, rest) = binary.split_at(k as usize);
            *binary = rest;
            match dtype == DType::Bool && data.iter().any(|&b| b > 1) {
                true => Err("BOOL binary data must be bytes 0 or 1".into()),
                false => Ok(data.to_vec()),
            }
        }
    };
    HostTensor::new(name.clone(), dtype, shape, data.map_err(&bad)?).map_err(bad)
}

/// Reads JSON `data` (flat or nested arrays) into a little-endian buffer of `numel` values.
///
/// `raw` is already known to be valid JSON, so a byte scan finds its values; each is converted
/// from its own text (Rust's float parsing is correctly rounded, serde_json's default is not),
/// straight into the buffer, and the count is checked as it goes.
fn json_data(dtype: DType, raw: &RawValue, numel: u64) -> Result<Vec<u8>, String> {
    let text = raw.get();
    if !text.starts_with('[') {
        return Err("data must be an array".into());
    }
    let bytes = text.as_bytes();
    // Each value takes at least two characters ("1,"): never reserve more than the text can fill.
    let mut out = Vec::with_capacity(numel.min(bytes.len() as u64 / 2 + 1) as usize * dtype.size());
    let (mut depth, mut got, mut i) = (0, 0u64, 0);
    while i < bytes.len() {
        let start = i;
        i += 1;
        match bytes[start] {
            b'[' if depth == MAX_NESTING => {
                return Err(format!("data is nested more than {MAX_NESTING} deep"));
            }
            b'[' => depth += 1,
            b']' => depth = depth.saturating_sub(1),
            b',' | b' ' | b'\t' | b'\n' | b'\r' => {}
            b't' | b'f' | b'-' | b'0'..=b'9' => {
                while i < bytes.len() && !b",] \t\n\r".contains(&bytes[i]) {
                    i += 1;
                }
                if got == numel {
                    return Err(format!(
                        "data has more values than the {numel} the shape holds"
                    ));
                }
                got += 1;
                // Values end at ASCII delimiters, so the slice is on character boundaries.
                push(dtype, &text[start..i], &mut out)?;
            }
            _ => return Err("data must hold only numbers or booleans, in arrays".into()),
        }
    }
    if got != numel {
        return Err(format!("data has {got} values but the shape holds {numel}"));
    }
    Ok(out)
}

/// Appends one JSON value (`tok`), checked to be representable in `dtype`.
fn push(dtype: DType, tok: &str, out: &mut Vec<u8>) -> Result<(), String> {
    let name = datatype_name(dtype);
    let shown = tok.get(..40).unwrap_or(tok); // a hostile value may be megabytes long
    let range = || format!("{shown} is out of range for {name}");
    match (dtype, tok) {
        (DType::Bool, "true" | "false") => out.push(u8::from(tok == "true")),
        (DType::Bool, _) => return Err(format!("BOOL data must be true or false, got {shown}")),
        (_, "true" | "false") => return Err(format!("{name} data must be numbers, got {tok}")),
        (DType::F64, _) => {
            out.extend_from_slice(&float::<f64>(tok).ok_or_else(range)?.to_le_bytes())
        }
        (DType::F32, _) => {
            out.extend_from_slice(&float::<f32>(tok).ok_or_else(range)?.to_le_bytes())
        }
        // Rounded twice (text to f64 to f16): wrong only within 2^-53 of a tie between halves.
        (DType::F16, _) => match float::<f64>(tok).map(f64_to_f16) {
            Some(h) if h & 0x7fff != 0x7c00 => out.extend_from_slice(&h.to_le_bytes()),
            _ => return Err(range()),
        },
        (DType::BF16, _) => {
            return Err("BF16 data cannot be JSON numbers: send it as binary data".into())
        }
        (DType::I64, _) => out.extend_from_slice(&int::<i64>(tok, shown, name)?.to_le_bytes()),
        (DType::I32, _) => out.extend_from_slice(&int::<i32>(tok, shown, name)?.to_le_bytes()),
        (DType::I16, _) => out.extend_from_slice(&int::<i16>(tok, shown, name)?.to_le_bytes()),
        (DType::I8, _) => out.extend_from_slice(&int::<i8>(tok, shown, name)?.to_le_bytes()),
        (DType::U8, _) => out.push(int::<u8>(tok, shown, name)?),
    }
    Ok(())
}

/// A finite float, correctly rounded from its text (too large for `F` gives `None`).
fn float<F: std::str::FromStr + Into<f64> + Copy>(tok: &str) -> Option<F> {
    tok.parse::<F>().ok().filter(|&x| x.into().is_finite())
}

/// An integer; a float is taken only when integral (`2.0`, `1e3`), never rounded.
fn int<T: TryFrom<i128>>(tok: &str, shown: &str, datatype: &str) -> Result<T, String> {
    let n = match tok.parse::<i128>() {
        Ok(n) => n,
        Err(_) => match tok.parse::<f64>() {
            Ok(f) if f.fract() == 0.0 => f as i128, // saturates, then is out of range below
            _ => return Err(format!("{shown} is not an integer, as {datatype} needs")),
        },
    };
    T::try_from(n).map_err(|_| format!("{shown} is out of range for {datatype}"))
}

/// A JSON array of at most `N` items, refused as soon as it grows past that.
struct Bounded<T, const N: usize>(Vec<T>);

impl<'de, T: Deserialize<'de>, const N: usize> Deserialize<'de> for Bounded<T, N> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T, const N: usize>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>, const N: usize> Visitor<'de> for V<T, N> {
            type Value = Bounded<T, N>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "an array of at most {N} items")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    if items.len() == N {
                        return Err(de::Error::invalid_length(N + 1, &self));
                    }
                    items.push(item);
                }
                Ok(Bounded(items))
            }
        }
        d.deserialize_seq(V(PhantomData))
    }
}

#[derive(Serialize)]
struct ResponseJson<'a> {
    model_name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    model_version: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    outputs: Vec<OutputOut<'a>>,
}

#[derive(Serialize)]
struct OutputOut<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: &'a [i64],
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<TensorData<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<BinarySize>,
}

#[derive(Serialize)]
struct BinarySize {
    binary_data_size: usize,
}

/// A tensor's values as a flat JSON array; FP16 and BF16 as their f32 values, which print as
/// the shortest decimal that reads back to the same f32.
struct TensorData<'a>(&'a HostTensor);

impl Serialize for TensorData<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let t = self.0;
        let mut seq = s.serialize_seq(Some(t.data.len() / t.dtype.size()))?;
        macro_rules! each {
            ($n:literal, $f:expr) => {
                for c in t.data.as_chunks::<$n>().0 {
                    seq.serialize_element(&$f(*c))?;
                }
            };
            (float $n:literal, $f:expr) => {
                for c in t.data.as_chunks::<$n>().0 {
                    let x = $f(*c);
                    finite(&t.name, f64::from(x))?;
                    seq.serialize_element(&x)?;
                }
            };
        }
        match t.dtype {
            DType::F32 => each!(float 4, f32::from_le_bytes),
            DType::F64 => each!(float 8, f64::from_le_bytes),
            DType::F16 => each!(float 2, |c| f16_to_f32(u16::from_le_bytes(c))),
            DType::BF16 => {
                each!(float 2, |c| f32::from_bits(u32::from(u16::from_le_bytes(c)) << 16))
            }
            DType::I64 => each!(8, i64::from_le_bytes),
            DType::I32 => each!(4, i32::from_le_bytes),
            DType::I16 => each!(2, i16::from_le_bytes),
            DType::I8 => each!(1, i8::from_le_bytes),
            DType::U8 => each!(1, |c: [u8; 1]| c[0]),
            DType::Bool => each!(1, |c: [u8; 1]| c[0] != 0),
        }
        seq.end()
    }
}

fn finite<E: ser::Error>(output: &str, x: f64) -> Result<(), E> {
    if x.is_finite() {
        return Ok(());
    }
    Err(E::custom(format!(
        "output '{output}' contains NaN or infinity, which JSON cannot carry: request it as \
         binary data (parameters.binary_data: true)"
    )))
}

/// Encodes a response. `outputs` come in model order. With `requested` empty, all of them go,
/// each binary when `binary_output`; otherwise only those requested (a name the model lacks is an
/// error), each binary per its own `binary`, else per `binary_output`. An output sent as JSON
/// must hold no NaN or infinity, which JSON has no numbers for: ask for it as binary.
pub fn encode_infer(
    model_name: &str,
    model_version: Option<&str>,
    id: Option<&str>,
    outputs: Vec<HostTensor>,
    requested: &[RequestedOutput],
    binary_output: bool,
) -> Result<EncodedResponse, OipError> {
    if let Some(r) = requested
        .iter()
        .find(|r| !outputs.iter().any(|o| o.name == r.name))
    {
        let known = outputs.iter().map(|o| o.name.clone()).collect();
        return Err(OipError::UnknownOutput {
            name: r.name.clone(),
            known,
        });
    }
    let chosen: Vec<(&HostTensor, bool)> = outputs
        .iter()
        .filter_map(|o| match requested.iter().find(|r| r.name == o.name) {
            Some(r) => Some((o, r.binary.unwrap_or(binary_output))),
            None => requested.is_empty().then_some((o, binary_output)),
        })
        .collect();
    let outputs = chosen
        .iter()
        .map(|&(t, binary)| OutputOut {
            name: &t.name,
            datatype: datatype_name(t.dtype),
            shape: &t.shape,
            data: (!binary).then_some(TensorData(t)),
            parameters: binary.then_some(BinarySize {
                binary_data_size: t.data.len(),
            }),
        })
        .collect();
    let json = ResponseJson {
        model_name,
        model_version,
        id,
        outputs,
    };
    let mut body = serde_json::to_vec(&json).map_err(|e| OipError::NotJson(e.to_string()))?;
    let binaries = || chosen.iter().filter(|c| c.1).map(|c| &c.0.data);
    if binaries().next().is_none() {
        return Ok(EncodedResponse {
            body,
            header_len: None,
        });
    }
    let header_len = Some(body.len());
    body.reserve_exact(binaries().map(Vec::len).sum());
    binaries().for_each(|data| body.extend_from_slice(data));
    Ok(EncodedResponse { body, header_len })
}

/// Rounds `x` to the nearest IEEE binary16 value, ties to even, as bits; too large gives ±inf.
fn f64_to_f16(x: f64) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 48) & 0x8000) as u16;
    let exp = ((bits >> 52) & 0x7ff) as i32;
    let man = bits & ((1 << 52) - 1);
    let e = exp - 1023;
    if exp == 0x7ff {
        return sign | 0x7c00 | if man != 0 { 0x200 } else { 0 };
    } else if e > 15 {
        return sign | 0x7c00;
    } else if exp == 0 || 28 - e > 63 {
        return sign; // below half the smallest subnormal (2^-25)
    }
    // Normal results keep 10 of 52 mantissa bits; subnormal ones count units of 2^-24.
    let (kept, shift) = match e >= -14 {
        true => (((e + 15) as u64) << 52 | man, 42),
        false => (man | 1 << 52, (28 - e) as u32),
    };
    let mut h = kept >> shift;
    let (rest, half) = (kept & ((1 << shift) - 1), 1u64 << (shift - 1));
    if rest > half || (rest == half && h & 1 == 1) {
        h += 1; // a carry into the exponent is still right, up to infinity
    }
    sign | h as u16
}

/// The f32 value of IEEE binary16 bits (exact).
fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let (exp, man) = (u32::from((h >> 10) & 0x1f), u32::from(h & 0x3ff));
    match exp {
        0 => f32::from_bits((man as f32 / 16_777_216.0).to_bits() | sign), // units of 2^-24
        31 => f32::from_bits(sign | 0x7f80_0000 | man << 13),
        _ => f32::from_bits(sign | (exp + 112) << 23 | man << 13),
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    const MAX: usize = 1 << 20;

    fn parse(json: &str) -> Result<InferRequest, OipError> {
        parse_infer(json.as_bytes(), None, MAX)
    }
    fn one(dt: &str, shape: &str, data: &str) -> Result<HostTensor, OipError> {
        let input = format!(r#"{{"name":"x","datatype":"{dt}","shape":{shape},"data": {data}}}"#);
        parse(&format!(r#"{{"inputs":[{input}]}}"#)).map(|mut r| r.inputs.remove(0))
    }
    fn tensor(name: &str, dtype: DType, shape: &[i64], data: Vec<u8>) -> HostTensor {
        let (name, shape) = (name.to_string(), shape.to_vec());
        HostTensor {
            name,
            dtype,
            shape,
            data,
        }
    }
    fn le_f32(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }
    /// A body as the Triton client sends it by default: binary inputs, binary_data_output.
    fn binary_body(inputs: &[(&str, &str, &str, usize)], data: &[u8]) -> (Vec<u8>, usize) {
        let list: Vec<String> = (inputs.iter())
            .map(|(n, dt, shape, k)| {
                let p = format!(r#"{{"binary_data_size":{k}}}"#);
                format!(r#"{{"name":"{n}","shape":{shape},"datatype":"{dt}","parameters":{p}}}"#)
            })
            .collect();
        let inputs = list.join(",");
        let json = format!(r#"{{"inputs":[{inputs}],"parameters":{{"binary_data_output":true}}}}"#);
        ([json.as_bytes(), data].concat(), json.len())
    }
    fn assert_refused<T: fmt::Debug>(result: Result<T, OipError>, want: &str) {
        let message = result.unwrap_err().to_string();
        assert!(message.contains(want), "{message:?} does not say {want:?}");
    }

    #[test]
    fn json_data_flat_or_nested() {
        let flat = one("FP32", "[2,2]", "[1, 2.5, -3, 0.1]").unwrap();
        assert_eq!(
            flat,
            one("FP32", "[2,2]", "[ [1, 2.5] ,\n[-3,0.1]]").unwrap()
        );
        assert_eq!(
            flat,
            tensor("x", DType::F32, &[2, 2], le_f32(&[1.0, 2.5, -3.0, 0.1]))
        );
        assert_eq!(one("INT64", "[]", "[7]").unwrap().data, 7i64.to_le_bytes());
        assert_eq!(
            one("UINT8", "[2,0]", "[[],[]]").unwrap().data,
            Vec::<u8>::new()
        );
        assert_eq!(
            one("INT32", "[1]", "[2.0]").unwrap().data,
            2i32.to_le_bytes()
        );
    }

    #[test]
    fn json_data_must_fit_datatype_and_shape() {
        let deep = format!("{}1{}", "[".repeat(12), "]".repeat(12));
        for (dt, shape, data, want) in [
            ("INT32", "[1]", "[1.5]", "1.5 is not an integer"),
            ("UINT8", "[1]", "[256]", "256 is out of range for UINT8"),
            ("INT8", "[1]", "[-129]", "-129 is out of range for INT8"),
            ("INT64", "[1]", "[1e20]", "out of range for INT64"),
            ("BOOL", "[1]", "[1]", "true or false"),
            ("FP32", "[1]", "[true]", "must be numbers"),
            ("FP32", "[1]", "[1e39]", "out of range for FP32"),
            ("FP16", "[1]", "[65520]", "out of range for FP16"),
            ("BF16", "[1]", "[1.0]", "send it as binary data"),
            (
                "FP32",
                "[3]",
                "[1, 2]",
                "data has 2 values but the shape holds 3",
            ),
            ("FP32", "[1]", "[[1], [2]]", "more values than the 1"),
            ("FP32", "[1]", "1", "must be an array"),
            ("FP32", "[1]", r#"["1"]"#, "only numbers or booleans"),
            ("FP32", "[1]", "[null]", "only numbers or booleans"),
            ("FP32", "[1]", &deep, "nested more than 9 deep"),
        ] {
            assert_refused(one(dt, shape, data), want);
        }
    }

    #[test]
    fn every_datatype_round_trips_through_json() {
        for (dt, data) in [
            ("FP32", "[0.1,-3.4028235e38,1e-45]"),
            ("FP64", "[0.1,-1.7976931348623157e308]"),
            ("FP16", "[0.5,-2.0,65504.0,5.9604645e-8]"),
            ("INT64", "[-9223372036854775808,9223372036854775807]"),
            ("INT32", "[-2147483648,2147483647]"),
            ("INT16", "[-32768,32767]"),
            ("INT8", "[-128,127]"),
            ("UINT8", "[0,255]"),
            ("BOOL", "[true,false]"),
        ] {
            let t = one(dt, &format!("[{}]", data.matches(',').count() + 1), data).unwrap();
            assert_eq!(
                (datatype_name(t.dtype), parse_datatype(dt)),
                (dt, Some(t.dtype))
            );
            let resp = encode_infer("m", None, None, vec![t.clone()], &[], false).unwrap();
            assert_eq!(resp.header_len, None);
            // A JSON output reads as a JSON input: parse it back, exactly.
            let text = String::from_utf8(resp.body).unwrap();
            let back = text.replace(r#"{"model_name":"m","outputs":"#, r#"{"inputs":"#);
            assert_eq!(parse(&back).unwrap().inputs, vec![t], "{text}");
        }
        // BF16 comes in only as binary data, and goes out in JSON as its f32 value.
        let t = tensor("b", DType::BF16, &[2], vec![0x80, 0x3f, 0x20, 0xc0]);
        let resp = encode_infer("m", None, None, vec![t], &[], false).unwrap();
        let v: Value = serde_json::from_slice(&resp.body).unwrap();
        assert_eq!(v["outputs"][0]["data"], json!([1.0, -2.5]));
        for dt in ["BYTES", "UINT16", "UINT32", "UINT64", "FLOAT"] {
            assert_refused(
                one(dt, "[1]", "[1]"),
                &format!("datatype {dt} is not supported"),
            );
        }
    }

    #[test]
    fn binary_data_round_trips_byte_exact() {
        let x: Vec<u8> = (0..24).collect();
        let spec = [("x", "FP32", "[2,3]", 24), ("m", "BOOL", "[3]", 3)];
        let (body, n) = binary_body(&spec, &[&x[..], &[1, 0, 1]].concat());
        let r = parse_infer(&body, Some(n), MAX).unwrap();
        assert!(r.binary_output && r.outputs.is_empty() && r.id.is_none());
        assert_eq!(r.inputs[0], tensor("x", DType::F32, &[2, 3], x.clone()));
        assert_eq!(r.inputs[1], tensor("m", DType::Bool, &[3], vec![1, 0, 1]));
        let resp = encode_infer("m", Some("1"), Some("r1"), r.inputs, &[], true).unwrap();
        let h = resp.header_len.unwrap();
        assert_eq!(resp.body[h..], body[n..]);
        let v: Value = serde_json::from_slice(&resp.body[..h]).unwrap();
        let size = |k: usize| json!({ "binary_data_size": k });
        assert_eq!(
            v,
            json!({"model_name": "m", "model_version": "1", "id": "r1", "outputs": [
                {"name": "x", "datatype": "FP32", "shape": [2, 3], "parameters": size(24)},
                {"name": "m", "datatype": "BOOL", "shape": [3], "parameters": size(3)}]})
        );
        // A header length covering the whole body is plain JSON.
        let json = r#"{"inputs":[{"name":"x","datatype":"INT8","shape":[1],"data":[3]}]}"#;
        assert!(parse_infer(json.as_bytes(), Some(json.len()), MAX).is_ok());
    }

    #[test]
    fn malformed_binary_data_is_refused() {
        let u8x4 = [("x", "UINT8", "[4]", 4)];
        for (spec, data, want) in [
            (
                &u8x4[..],
                &[1, 2, 3][..],
                "runs past the end of the body (3 bytes left)",
            ),
            (
                &u8x4,
                &[1, 2, 3, 4, 5],
                "1 bytes follow the last input's binary data",
            ),
            (
                &[("x", "UINT8", "[4]", 3)],
                &[1, 2, 3],
                "binary_data_size is 3 but shape",
            ),
            (&[("m", "BOOL", "[2]", 2)], &[1, 2], "bytes 0 or 1"),
        ] {
            let (body, n) = binary_body(spec, data);
            assert_refused(parse_infer(&body, Some(n), MAX), want);
        }
        let (body, n) = binary_body(&u8x4, &[1, 2, 3, 4]);
        let (len, past) = (body.len(), parse_infer(&body, Some(body.len() + 1), MAX));
        let want = format!(
            "Inference-Header-Content-Length is {} but the body has {len}",
            len + 1
        );
        assert_refused(past, &want);
        assert_refused(
            parse_infer(&body[..n], None, MAX),
            "needs the Inference-Header",
        );
        assert_refused(parse_infer(&body, None, MAX), "trailing characters");
        let both = r#"{"inputs":[{"name":"x","datatype":"UINT8","shape":[1],"data":[1],
            "parameters":{"binary_data_size":1}}]}"#;
        let body = [both.as_bytes(), &[1]].concat();
        assert_refused(
            parse_infer(&body, Some(both.len()), MAX),
            "has both data and",
        );
    }

    #[test]
    fn hostile_shapes_are_refused_before_allocating() {
        for (shape, want) in [
            (
                "[262145]",
                "shape [262145] of FP32 is larger than the 1048576-byte limit",
            ),
            ("[4611686018427387904,4]", "is larger than"),
            (
                "[9223372036854775807,9223372036854775807,0]",
                "is larger than",
            ),
            ("[2,-1]", "shape [2, -1] has a negative dimension"),
            ("[1,1,1,1,1,1,1,1,1]", "shape has 9 dimensions, more than 8"),
            (
                &format!("[{}1]", "1,".repeat(64)),
                "expected an array of at most 64 items",
            ),
            ("[18446744073709551615]", "invalid inference request JSON"),
            // Legal, but the data is far too short: found without reserving the whole tensor.
            ("[262144]", "data has 1 values but the shape holds 262144"),
        ] {
            assert_refused(one("FP32", shape, "[1]"), want);
        }
    }

    #[test]
    fn request_structure_is_checked() {
        let x = r#"{"name":"x","datatype":"INT8","shape":[1],"data":[1]}"#;
        let inputs = |list: &str| parse(&format!(r#"{{"inputs":[{list}]}}"#));
        assert_refused(inputs(""), "at least one input");
        assert_refused(
            inputs(&[x; 65].join(",")),
            "expected an array of at most 64 items",
        );
        assert_refused(inputs(&[x; 2].join(",")), "input 'x' is given twice");
        let long = x.replace(r#""x""#, &format!(r#""{}""#, "n".repeat(257)));
        assert_refused(inputs(&long), "input name must be 1 to 256 bytes, got 257");
        assert_refused(inputs(&x.replace(r#","data":[1]"#, "")), "has no data");
        let shm = r#"{"name":"x","datatype":"INT8","shape":[1],
            "parameters":{"shared_memory_region":"r","shared_memory_byte_size":1}}"#;
        assert_refused(inputs(shm), "the shared-memory extension is not supported");
        assert_refused(parse("not json"), "invalid inference request JSON");
        let with = |outputs: &str| parse(&format!(r#"{{"inputs":[{x}],"outputs":[{outputs}]}}"#));
        let r = with(r#"{"name":"y","parameters":{"binary_data":true}},{"name":"z"}"#).unwrap();
        assert!(!r.binary_output);
        assert_eq!(
            r.outputs[0],
            RequestedOutput {
                name: "y".into(),
                binary: Some(true)
            }
        );
        assert_eq!(
            r.outputs[1],
            RequestedOutput {
                name: "z".into(),
                binary: None
            }
        );
        assert_refused(
            with(r#"{"name":"y"},{"name":"y"}"#),
            "output 'y' is requested twice",
        );
        let classify = with(r#"{"name":"y","parameters":{"classification":2}}"#);
        assert_refused(
            classify,
            "classification or shared-memory extension is not supported",
        );
    }

    #[test]
    fn encode_filters_outputs_and_mixes_json_and_binary() {
        let outs = || {
            vec![
                tensor("a", DType::I32, &[1], 5i32.to_le_bytes().to_vec()),
                tensor("b", DType::F32, &[2], le_f32(&[0.1, f32::NAN])),
                tensor("c", DType::U8, &[2], vec![7, 8]),
            ]
        };
        let ask = |name: &str, binary| RequestedOutput {
            name: name.into(),
            binary,
        };
        // Model order, not request order; an output's own binary flag beats the request's.
        let requested = [ask("c", None), ask("b", Some(true))];
        let resp = encode_infer("m", None, None, outs(), &requested, false).unwrap();
        let h = resp.header_len.unwrap();
        assert_eq!(resp.body[h..], le_f32(&[0.1, f32::NAN]));
        let v: Value = serde_json::from_slice(&resp.body[..h]).unwrap();
        assert_eq!(
            v,
            json!({"model_name": "m", "outputs": [
                {"name": "b", "datatype": "FP32", "shape": [2],
                 "parameters": {"binary_data_size": 8}},
                {"name": "c", "datatype": "UINT8", "shape": [2], "data": [7, 8]}]})
        );
        let nan = encode_infer("m", None, None, outs(), &[ask("b", Some(false))], true);
        assert_refused(nan, "output 'b' contains NaN or infinity");
        let unknown = encode_infer("m", None, None, outs(), &[ask("zz", None)], true);
        let known = vec!["a".into(), "b".into(), "c".into()];
        assert_eq!(
            unknown,
            Err(OipError::UnknownOutput {
                name: "zz".into(),
                known
            })
        );
        // f32 prints as the shortest decimal that reads back the same, not as a widened f64.
        let t = tensor("f", DType::F32, &[1], le_f32(&[0.1]));
        let resp = encode_infer("m", None, None, vec![t], &[], false).unwrap();
        assert!(String::from_utf8(resp.body)
            .unwrap()
            .contains(r#""data":[0.1]"#));
    }

    #[test]
    fn f16_conversion_rounds_to_nearest_even() {
        for h in 0..=u16::MAX {
            let x = f16_to_f32(h);
            match x.is_nan() {
                true => assert!(h & 0x7c00 == 0x7c00 && h & 0x3ff != 0),
                false => assert_eq!(f64_to_f16(f64::from(x)), h, "{h:#06x}"),
            }
        }
        let (ulp, tiny) = (2f64.powi(-10), 2f64.powi(-25));
        for (x, h) in [
            (1.0 + ulp / 2.0, 0x3c00),         // tie: to even, down
            (1.0 + 1.5 * ulp, 0x3c02),         // tie: to even, up
            (1.0 + ulp / 2.0 + 1e-12, 0x3c01), // just above the tie
            (65519.99, 0x7bff),
            (65520.0, 0x7c00), // tie between the largest and 2^16: to even, infinity
            (-1e10, 0xfc00),
            (tiny, 0x0000), // half the smallest subnormal: to even, zero
            (tiny * 1.0001, 0x0001),
            (2f64.powi(-14) * (1.0 - 2f64.powi(-12)), 0x0400), // rounds up into the normals
            (-0.0, 0x8000),
            (1e-300, 0x0000),
        ] {
            assert_eq!(f64_to_f16(x), h, "{x:e}");
        }
    }
}
