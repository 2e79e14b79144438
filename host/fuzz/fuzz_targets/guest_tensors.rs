//! Tensors as a handler hands them back over the WIT boundary (name, dtype, shape, data), with
//! lying shapes, dtypes and lengths and long lists: the host's checks (`HostTensor::new`, the
//! batching key) refuse what does not add up and never panic or overflow; what they accept has
//! exactly the bytes its shape and dtype need.
#![no_main]
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use tessera::runtime::{batch_key, DType, HostTensor};

const DTYPES: [DType; 10] = [
    DType::F32,
    DType::F64,
    DType::F16,
    DType::BF16,
    DType::I64,
    DType::I32,
    DType::I16,
    DType::I8,
    DType::U8,
    DType::Bool,
];

fn tensor(u: &mut Unstructured) -> Result<Result<HostTensor, String>> {
    let len = u.int_in_range(0..=16)?;
    let name = String::from_utf8_lossy(u.bytes(len)?).into_owned();
    let dtype = DTYPES[u.choose_index(DTYPES.len())?];
    let dims = u.int_in_range(0..=10)?;
    let mut shape = Vec::with_capacity(dims);
    for _ in 0..dims {
        // Mostly small dimensions, sometimes huge ones (products that overflow).
        shape.push(if u.ratio(1, 8)? {
            u.arbitrary::<u64>()?
        } else {
            u.int_in_range(0..=6)?
        });
    }
    let len = u.int_in_range(0..=4096)?;
    Ok(HostTensor::new(name, dtype, shape, vec![0u8; len]))
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let mut accepted = Vec::new();
    while let Ok(t) = tensor(&mut u) {
        if let Ok(t) = t {
            let numel = t.shape.iter().try_fold(1i64, |n, &d| n.checked_mul(d));
            let bytes = numel.and_then(|n| n.checked_mul(t.dtype.size() as i64));
            assert_eq!(bytes, Some(t.data.len() as i64));
            assert!(t.shape.len() <= 8 && t.shape.iter().all(|&d| d >= 0));
            accepted.push(t);
        }
        if u.is_empty() {
            break;
        }
    }
    if let Some(key) = batch_key(&accepted) {
        assert_eq!(key.len(), accepted.len());
    }
});
