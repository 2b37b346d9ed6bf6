//! [`DType`]: the element types moeshift moves, with their sizes and PyTorch names.

use std::fmt;
use std::str::FromStr;

/// An element type. Names follow PyTorch (`torch.bfloat16` is [`DType::Bf16`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    /// `bfloat16`: 1 sign, 8 exponent, 7 mantissa bits.
    Bf16,
    /// `float16` (`half`): IEEE binary16.
    F16,
    /// `float32` (`float`): IEEE binary32.
    F32,
    /// `float64` (`double`): IEEE binary64.
    F64,
    /// `float8_e4m3fn`: 8-bit float, 4 exponent and 3 mantissa bits, finite only (no
    /// infinities, one NaN pattern).
    F8E4M3Fn,
    /// `float8_e5m2`: 8-bit float, 5 exponent and 2 mantissa bits.
    F8E5M2,
    /// `int8`.
    I8,
    /// `int32` (`int`).
    I32,
    /// `int64` (`long`).
    I64,
    /// `uint8`.
    U8,
    /// `bool`, one byte per element.
    Bool,
}

/// Error for a dtype name that is not one of moeshift's PyTorch names. Quotes the name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown dtype {name:?}: expected a PyTorch dtype name such as \"bfloat16\", \
     \"float32\", \"float8_e4m3fn\" or \"torch.int64\""
)]
pub struct UnknownDType {
    /// The name as given.
    pub name: String,
}

impl DType {
    /// Every dtype, in declaration order.
    pub const ALL: [DType; 11] = [
        DType::Bf16,
        DType::F16,
        DType::F32,
        DType::F64,
        DType::F8E4M3Fn,
        DType::F8E5M2,
        DType::I8,
        DType::I32,
        DType::I64,
        DType::U8,
        DType::Bool,
    ];

    /// Size of one element in bytes.
    pub const fn size_bytes(self) -> usize {
        match self {
            DType::F8E4M3Fn | DType::F8E5M2 | DType::I8 | DType::U8 | DType::Bool => 1,
            DType::Bf16 | DType::F16 => 2,
            DType::F32 | DType::I32 => 4,
            DType::F64 | DType::I64 => 8,
        }
    }

    /// The canonical PyTorch name without the `torch.` prefix (`"bfloat16"`, `"float32"`, …).
    pub const fn name(self) -> &'static str {
        match self {
            DType::Bf16 => "bfloat16",
            DType::F16 => "float16",
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::F8E4M3Fn => "float8_e4m3fn",
            DType::F8E5M2 => "float8_e5m2",
            DType::I8 => "int8",
            DType::I32 => "int32",
            DType::I64 => "int64",
            DType::U8 => "uint8",
            DType::Bool => "bool",
        }
    }

    /// True for the floating-point types (including the fp8 ones).
    pub const fn is_floating_point(self) -> bool {
        matches!(
            self,
            DType::Bf16 | DType::F16 | DType::F32 | DType::F64 | DType::F8E4M3Fn | DType::F8E5M2
        )
    }

    /// Parses a PyTorch dtype name, with or without the `torch.` prefix, including PyTorch's
    /// aliases (`half`, `float`, `double`, `int`, `long`). Exact and case-sensitive, like
    /// `getattr(torch, name)`.
    ///
    /// ```
    /// use moeshift_tensor::DType;
    /// assert_eq!(DType::parse("torch.bfloat16"), Ok(DType::Bf16));
    /// assert_eq!(DType::parse("half"), Ok(DType::F16));
    /// assert!(DType::parse("float8_e4m3fnuz").is_err());
    /// ```
    pub fn parse(name: &str) -> Result<Self, UnknownDType> {
        let bare = name.strip_prefix("torch.").unwrap_or(name);
        Ok(match bare {
            "bfloat16" => DType::Bf16,
            "float16" | "half" => DType::F16,
            "float32" | "float" => DType::F32,
            "float64" | "double" => DType::F64,
            "float8_e4m3fn" => DType::F8E4M3Fn,
            "float8_e5m2" => DType::F8E5M2,
            "int8" => DType::I8,
            "int32" | "int" => DType::I32,
            "int64" | "long" => DType::I64,
            "uint8" => DType::U8,
            "bool" => DType::Bool,
            _ => {
                return Err(UnknownDType {
                    name: name.to_owned(),
                })
            }
        })
    }
}

impl fmt::Display for DType {
    /// The canonical PyTorch name without prefix, as [`DType::name`].
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DType {
    type Err = UnknownDType;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DType::parse(s)
    }
}

#[cfg(feature = "serde")]
impl serde::Serialize for DType {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for DType {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        DType::parse(&name).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_the_formats() {
        // Bit widths of the formats: 16-bit floats, 8-bit floats, and the integer widths.
        let expected = [
            (DType::Bf16, 2),
            (DType::F16, 2),
            (DType::F32, 4),
            (DType::F64, 8),
            (DType::F8E4M3Fn, 1),
            (DType::F8E5M2, 1),
            (DType::I8, 1),
            (DType::I32, 4),
            (DType::I64, 8),
            (DType::U8, 1),
            (DType::Bool, 1),
        ];
        assert_eq!(expected.len(), DType::ALL.len());
        for (dt, size) in expected {
            assert_eq!(dt.size_bytes(), size, "{dt}");
        }
    }

    #[test]
    fn pytorch_names_and_aliases_parse() {
        let cases = [
            ("bfloat16", DType::Bf16),
            ("float16", DType::F16),
            ("half", DType::F16),
            ("float32", DType::F32),
            ("float", DType::F32),
            ("float64", DType::F64),
            ("double", DType::F64),
            ("float8_e4m3fn", DType::F8E4M3Fn),
            ("float8_e5m2", DType::F8E5M2),
            ("int8", DType::I8),
            ("int32", DType::I32),
            ("int", DType::I32),
            ("int64", DType::I64),
            ("long", DType::I64),
            ("uint8", DType::U8),
            ("bool", DType::Bool),
        ];
        for (name, dt) in cases {
            assert_eq!(DType::parse(name), Ok(dt), "{name}");
            assert_eq!(format!("torch.{name}").parse::<DType>(), Ok(dt), "{name}");
        }
    }

    #[test]
    fn display_is_the_canonical_name_and_roundtrips() {
        assert_eq!(DType::Bf16.to_string(), "bfloat16");
        assert_eq!(DType::F16.to_string(), "float16");
        assert_eq!(DType::F8E4M3Fn.to_string(), "float8_e4m3fn");
        assert_eq!(DType::I64.to_string(), "int64");
        for dt in DType::ALL {
            assert_eq!(dt.to_string().parse::<DType>(), Ok(dt));
        }
    }

    #[test]
    fn unknown_names_are_quoted_in_the_error() {
        for bad in [
            "",
            "torch.",
            "Float32",
            "float8_e4m3fnuz",
            "int16",
            "torch.torch.float32",
            " float32",
        ] {
            let err = DType::parse(bad).unwrap_err();
            assert_eq!(err.name, bad);
            assert!(
                err.to_string().contains(&format!("{bad:?}")),
                "{err} does not quote {bad:?}"
            );
        }
    }

    #[test]
    fn floating_point_classification() {
        let floats: Vec<DType> = DType::ALL
            .into_iter()
            .filter(|d| d.is_floating_point())
            .collect();
        assert_eq!(
            floats,
            [
                DType::Bf16,
                DType::F16,
                DType::F32,
                DType::F64,
                DType::F8E4M3Fn,
                DType::F8E5M2
            ]
        );
    }

    #[cfg(feature = "serde")]
    #[test]
    fn serde_uses_the_pytorch_names() {
        let json = serde_json::to_string(&[DType::Bf16, DType::F32]).unwrap();
        assert_eq!(json, r#"["bfloat16","float32"]"#);
        let back: Vec<DType> = serde_json::from_str(r#"["torch.half","long"]"#).unwrap();
        assert_eq!(back, [DType::F16, DType::I64]);
        let err = serde_json::from_str::<DType>(r#""complex64""#).unwrap_err();
        assert!(err.to_string().contains("\"complex64\""), "{err}");
    }
}
