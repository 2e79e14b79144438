//! Building and reading tensors that cross the host boundary.
use crate::{Dtype, HandlerError, Tensor};

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F16 | Dtype::Bf16 | Dtype::I16 => 2,
            Dtype::I8 | Dtype::U8 | Dtype::Boolean => 1,
        }
    }
}

macro_rules! constructor {
    ($fn:ident, $t:ty, $dtype:expr) => {
        #[doc = concat!("A tensor of `", stringify!($t), "` values with the given shape.")]
        pub fn $fn(name: &str, shape: &[u64], values: &[$t]) -> Result<Tensor, HandlerError> {
            check_len(name, shape, values.len())?;
            let mut data = Vec::with_capacity(values.len() * std::mem::size_of::<$t>());
            for v in values {
                data.extend_from_slice(&v.to_le_bytes());
            }
            Ok(Tensor {
                name: name.into(),
                dtype: $dtype,
                shape: shape.to_vec(),
                data,
            })
        }
    };
}

fn check_len(name: &str, shape: &[u64], len: usize) -> Result<(), HandlerError> {
    let want: u64 = shape.iter().product();
    if want != len as u64 {
        return Err(HandlerError::Internal(format!(
            "tensor '{name}': shape {shape:?} needs {want} values, got {len}"
        )));
    }
    Ok(())
}

/// The model's first output (most models return one tensor).
pub fn first_output(outputs: &[Tensor]) -> Result<&Tensor, HandlerError> {
    outputs
        .first()
        .ok_or_else(|| HandlerError::Internal("model returned no output".into()))
}

impl Tensor {
    constructor!(from_f32, f32, Dtype::F32);
    constructor!(from_f64, f64, Dtype::F64);
    constructor!(from_i64, i64, Dtype::I64);
    constructor!(from_i32, i32, Dtype::I32);

    /// A `u8` tensor, taking ownership of the bytes (no copy).
    pub fn from_u8(name: &str, shape: &[u64], values: Vec<u8>) -> Result<Tensor, HandlerError> {
        check_len(name, shape, values.len())?;
        Ok(Tensor {
            name: name.into(),
            dtype: Dtype::U8,
            shape: shape.to_vec(),
            data: values,
        })
    }

    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }

    /// Read access with dtype checks.
    pub fn view(&self) -> TensorView<'_> {
        TensorView(self)
    }
}

/// Typed reads of a [`Tensor`].
pub struct TensorView<'a>(&'a Tensor);

macro_rules! reader {
    ($fn:ident, $t:ty, $dtype:pat) => {
        #[doc = concat!("The values as `", stringify!($t), "`; errors on another dtype.")]
        pub fn $fn(&self) -> Result<Vec<$t>, HandlerError> {
            let t = self.0;
            if !matches!(t.dtype, $dtype) {
                return Err(HandlerError::Internal(format!(
                    "tensor '{}' is {:?}, expected {}",
                    t.name,
                    t.dtype,
                    stringify!($t)
                )));
            }
            const N: usize = std::mem::size_of::<$t>();
            Ok(t.data
                .chunks_exact(N)
                .map(|c| <$t>::from_le_bytes(c.try_into().unwrap()))
                .collect())
        }
    };
}

impl<'a> TensorView<'a> {
    reader!(f32, f32, Dtype::F32);
    reader!(f64, f64, Dtype::F64);
    reader!(i64, i64, Dtype::I64);
    reader!(i32, i32, Dtype::I32);

    /// The raw bytes of a `u8` (or bool) tensor.
    pub fn u8(&self) -> Result<&'a [u8], HandlerError> {
        match self.0.dtype {
            Dtype::U8 | Dtype::Boolean => Ok(&self.0.data),
            other => Err(HandlerError::Internal(format!(
                "tensor '{}' is {other:?}, expected u8",
                self.0.name
            ))),
        }
    }
}
