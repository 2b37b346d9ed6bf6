//! Element types and reductions of the host all-reduce.

use std::fmt;

/// How an all-reduce combines the ranks' values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    /// Sum. Integer sums that overflow are an error, not a wrap.
    Sum,
    /// Maximum. For floats a NaN loses against a number (IEEE `maxNum`).
    Max,
    /// Minimum. For floats a NaN loses against a number (IEEE `minNum`).
    Min,
}

impl ReduceOp {
    fn code(self) -> u8 {
        match self {
            Self::Sum => 1,
            Self::Max => 2,
            Self::Min => 3,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            1 => Self::Sum,
            2 => Self::Max,
            3 => Self::Min,
            _ => return None,
        })
    }
}

impl fmt::Display for ReduceOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Sum => "sum",
            Self::Max => "max",
            Self::Min => "min",
        })
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
    impl Sealed for i32 {}
    impl Sealed for i64 {}
}

/// An element type the host all-reduce supports: `f32`, `f64`, `i32`, `i64`.
///
/// Values travel little-endian. Every rank combines the contributions in rank order
/// (rank 0's, then rank 1's, …), so floating-point results are bit-identical on all ranks.
pub trait Reducible: sealed::Sealed + Copy + Send + Sync + 'static {
    /// Type name used in messages.
    const NAME: &'static str;
    /// Encoded size in bytes.
    const SIZE: usize;
    /// Type code carried in frame headers.
    #[doc(hidden)]
    const CODE: u8;
    /// Writes `self` into `out` (`SIZE` bytes), little-endian.
    #[doc(hidden)]
    fn put(self, out: &mut [u8]);
    /// Reads a value from `SIZE` little-endian bytes.
    #[doc(hidden)]
    fn take(bytes: &[u8]) -> Self;
    /// Combines two values; `None` when an integer sum overflows.
    #[doc(hidden)]
    fn combine(self, other: Self, op: ReduceOp) -> Option<Self>;
}

macro_rules! float_reducible {
    ($t:ty, $code:expr) => {
        impl Reducible for $t {
            const NAME: &'static str = stringify!($t);
            const SIZE: usize = std::mem::size_of::<$t>();
            const CODE: u8 = $code;
            fn put(self, out: &mut [u8]) {
                out.copy_from_slice(&self.to_le_bytes());
            }
            fn take(bytes: &[u8]) -> Self {
                let mut b = [0u8; std::mem::size_of::<$t>()];
                b.copy_from_slice(bytes);
                <$t>::from_le_bytes(b)
            }
            fn combine(self, other: Self, op: ReduceOp) -> Option<Self> {
                Some(match op {
                    ReduceOp::Sum => self + other,
                    ReduceOp::Max => self.max(other),
                    ReduceOp::Min => self.min(other),
                })
            }
        }
    };
}

macro_rules! int_reducible {
    ($t:ty, $code:expr) => {
        impl Reducible for $t {
            const NAME: &'static str = stringify!($t);
            const SIZE: usize = std::mem::size_of::<$t>();
            const CODE: u8 = $code;
            fn put(self, out: &mut [u8]) {
                out.copy_from_slice(&self.to_le_bytes());
            }
            fn take(bytes: &[u8]) -> Self {
                let mut b = [0u8; std::mem::size_of::<$t>()];
                b.copy_from_slice(bytes);
                <$t>::from_le_bytes(b)
            }
            fn combine(self, other: Self, op: ReduceOp) -> Option<Self> {
                match op {
                    ReduceOp::Sum => self.checked_add(other),
                    ReduceOp::Max => Some(self.max(other)),
                    ReduceOp::Min => Some(self.min(other)),
                }
            }
        }
    };
}

float_reducible!(f32, 1);
float_reducible!(f64, 2);
int_reducible!(i32, 3);
int_reducible!(i64, 4);

/// The header code of an all-reduce of `T` with `op`.
pub(crate) fn code_of<T: Reducible>(op: ReduceOp) -> u8 {
    (T::CODE << 4) | op.code()
}

/// Describes a header code, e.g. `sum of f64`.
pub(crate) fn describe_code(code: u8) -> Option<String> {
    let name = match code >> 4 {
        1 => "f32",
        2 => "f64",
        3 => "i32",
        4 => "i64",
        _ => return None,
    };
    let op = ReduceOp::from_code(code & 0xf)?;
    Some(format!("{op} of {name}"))
}

/// Encodes values little-endian.
pub(crate) fn encode<T: Reducible>(values: &[T]) -> Vec<u8> {
    let mut out = vec![0u8; values.len() * T::SIZE];
    for (v, chunk) in values.iter().zip(out.chunks_exact_mut(T::SIZE)) {
        v.put(chunk);
    }
    out
}

/// Folds the contributions (in the order given: rank order) into `out`, element by element.
/// Returns the index of the first element whose integer sum overflowed.
pub(crate) fn fold<T: Reducible>(
    contributions: &[&[u8]],
    op: ReduceOp,
    out: &mut [T],
) -> Result<(), usize> {
    for (i, slot) in out.iter_mut().enumerate() {
        let at = i * T::SIZE;
        let mut acc: Option<T> = None;
        for c in contributions {
            let v = T::take(&c[at..at + T::SIZE]);
            acc = Some(match acc {
                None => v,
                Some(a) => a.combine(v, op).ok_or(i)?,
            });
        }
        if let Some(a) = acc {
            *slot = a;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_name_type_and_operation() {
        assert_eq!(
            describe_code(code_of::<f64>(ReduceOp::Sum)).as_deref(),
            Some("sum of f64")
        );
        assert_eq!(
            describe_code(code_of::<i32>(ReduceOp::Max)).as_deref(),
            Some("max of i32")
        );
        assert_eq!(
            describe_code(code_of::<f32>(ReduceOp::Min)).as_deref(),
            Some("min of f32")
        );
        assert_eq!(
            describe_code(code_of::<i64>(ReduceOp::Sum)).as_deref(),
            Some("sum of i64")
        );
        assert_eq!(describe_code(0), None);
        assert_eq!(describe_code(0x20), None);
        // Distinct type/op pairs never share a code.
        let mut codes = vec![];
        for op in [ReduceOp::Sum, ReduceOp::Max, ReduceOp::Min] {
            codes.extend([
                code_of::<f32>(op),
                code_of::<f64>(op),
                code_of::<i32>(op),
                code_of::<i64>(op),
            ]);
        }
        let n = codes.len();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), n);
    }

    #[test]
    fn fold_sums_in_rank_order() {
        let a = encode(&[1i64, -5, 7]);
        let b = encode(&[10i64, 5, 0]);
        let c = encode(&[100i64, 0, -7]);
        let mut out = [0i64; 3];
        fold(&[&a, &b, &c], ReduceOp::Sum, &mut out).expect("no overflow");
        assert_eq!(out, [111, 0, 0]);
        fold(&[&a, &b, &c], ReduceOp::Max, &mut out).expect("max");
        assert_eq!(out, [100, 5, 7]);
        fold(&[&a, &b, &c], ReduceOp::Min, &mut out).expect("min");
        assert_eq!(out, [1, -5, -7]);
    }

    #[test]
    fn float_sum_order_is_rank_order() {
        // 1e16 + 1 + 1 in this order loses both ones; another order would keep them.
        let parts = [encode(&[1e16f64]), encode(&[1.0f64]), encode(&[1.0f64])];
        let refs: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
        let mut out = [0f64];
        fold(&refs, ReduceOp::Sum, &mut out).expect("sum");
        assert_eq!(out[0], 1e16);
        let f32s = [encode(&[0.5f32, 2.0]), encode(&[0.25f32, -1.0])];
        let refs: Vec<&[u8]> = f32s.iter().map(|p| p.as_slice()).collect();
        let mut out = [0f32; 2];
        fold(&refs, ReduceOp::Sum, &mut out).expect("sum");
        assert_eq!(out, [0.75, 1.0]);
    }

    #[test]
    fn integer_overflow_names_the_element() {
        let a = encode(&[0i32, i32::MAX]);
        let b = encode(&[0i32, 1]);
        let mut out = [0i32; 2];
        assert_eq!(fold(&[&a, &b], ReduceOp::Sum, &mut out), Err(1));
    }

    #[test]
    fn nan_loses_in_max_and_min() {
        let a = encode(&[f64::NAN]);
        let b = encode(&[2.0f64]);
        let mut out = [0f64];
        fold(&[&a, &b], ReduceOp::Max, &mut out).expect("max");
        assert_eq!(out[0], 2.0);
        fold(&[&a, &b], ReduceOp::Min, &mut out).expect("min");
        assert_eq!(out[0], 2.0);
    }
}
