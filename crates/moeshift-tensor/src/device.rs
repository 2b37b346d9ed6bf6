//! [`Device`]: where a buffer's memory lives.

use std::fmt;
use std::str::FromStr;

/// Where memory lives: host DRAM or one CUDA device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Device {
    /// Host memory (PyTorch's `cpu`).
    #[default]
    Host,
    /// The CUDA device with this ordinal (PyTorch's `cuda:N`).
    Cuda(usize),
}

/// Error for a device string that is not `cpu`, `cuda` or `cuda:N`. Quotes the string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown device {name:?}: expected \"cpu\", \"cuda\" or \"cuda:N\"")]
pub struct UnknownDevice {
    /// The string as given.
    pub name: String,
}

impl Device {
    /// True for [`Device::Host`].
    pub const fn is_host(self) -> bool {
        matches!(self, Device::Host)
    }

    /// The CUDA ordinal, or `None` for host memory.
    pub const fn cuda_ordinal(self) -> Option<usize> {
        match self {
            Device::Host => None,
            Device::Cuda(ordinal) => Some(ordinal),
        }
    }
}

impl fmt::Display for Device {
    /// PyTorch's spelling: `cpu` or `cuda:N`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Host => f.write_str("cpu"),
            Device::Cuda(ordinal) => write!(f, "cuda:{ordinal}"),
        }
    }
}

impl FromStr for Device {
    type Err = UnknownDevice;

    /// Parses PyTorch's spellings: `cpu`, `cuda` (ordinal 0) and `cuda:N`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || UnknownDevice { name: s.to_owned() };
        match s {
            "cpu" => Ok(Device::Host),
            "cuda" => Ok(Device::Cuda(0)),
            _ => {
                let digits = s.strip_prefix("cuda:").ok_or_else(bad)?;
                if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad());
                }
                digits.parse().map(Device::Cuda).map_err(|_| bad())
            }
        }
    }
}

#[cfg(feature = "serde")]
impl serde::Serialize for Device {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for Device {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pytorch_spellings() {
        assert_eq!("cpu".parse(), Ok(Device::Host));
        assert_eq!("cuda".parse(), Ok(Device::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(Device::Cuda(3)));
        for bad in [
            "", "gpu", "cuda:", "cuda:-1", "cuda:+1", "cuda:x", "CPU", "cuda:1:2",
        ] {
            let err = bad.parse::<Device>().unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn display_roundtrips() {
        assert_eq!(Device::Host.to_string(), "cpu");
        assert_eq!(Device::Cuda(7).to_string(), "cuda:7");
        for d in [Device::Host, Device::Cuda(0), Device::Cuda(12)] {
            assert_eq!(d.to_string().parse(), Ok(d));
        }
        assert_eq!(Device::Cuda(2).cuda_ordinal(), Some(2));
        assert!(Device::Host.is_host());
        assert_eq!(Device::Host.cuda_ordinal(), None);
    }
}
