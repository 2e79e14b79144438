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

    /// The same tensor under another shape of as many elements (its bytes unchanged): a batch
    /// dimension of 1 in front of an image staged with `as_input`, say.
    pub fn reshape(mut self, shape: &[u64]) -> Result<Tensor, HandlerError> {
        let count = |s: &[u64]| s.iter().try_fold(1u64, |n, &d| n.checked_mul(d));
        if count(shape).is_none() || count(shape) != count(&self.shape) {
            return Err(HandlerError::Internal(format!(
                "tensor '{}': cannot reshape {:?} to {shape:?}",
                self.name, self.shape
            )));
        }
        self.shape = shape.to_vec();
        Ok(self)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reshape_keeps_the_bytes_and_the_element_count() {
        let t = Tensor::from_u8("x", &[2, 3], vec![1, 2, 3, 4, 5, 6]).unwrap();
        let r = t.clone().reshape(&[1, 3, 2]).unwrap();
        assert_eq!(
            (r.shape.as_slice(), r.data.as_slice()),
            (&[1, 3, 2][..], &t.data[..])
        );
        // A data-less tensor (`as_input`'s) reshapes by its element count too.
        let staged = Tensor {
            data: Vec::new(),
            ..t.clone()
        };
        assert_eq!(staged.reshape(&[6, 1]).unwrap().shape, [6, 1]);
        for bad in [&[5][..], &[2, 2, 2], &[u64::MAX, 2, 0]] {
            assert!(t.clone().reshape(bad).is_err(), "{bad:?}");
        }
    }
}
