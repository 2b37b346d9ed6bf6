//! [`ParamRegistry`]: the worker's parameters by name, with the memory each update writes.
//!
//! An update is checked against the registry before any of its bytes are written: a name the
//! worker did not register, or a dtype or shape that differs from the registration, is a
//! [`RegistryError`] and leaves every parameter as it was.

use std::collections::HashMap;

use crate::digest::{Digest, Hasher};
use crate::meta::ParamMeta;
use crate::patch::{PatchError, SparsePatch};

/// Memory that backs one registered parameter.
pub trait ParamStorage {
    /// Bytes the memory holds.
    fn byte_len(&self) -> usize;
}

/// Parameter memory the CPU can read and write directly.
///
/// Implemented for `Vec<u8>`, `[u8]`, `&mut [u8]`, boxes of any implementor (so a registry
/// of `Box<dyn HostStorage + Send>` can mix kinds) and
/// [`moeshift_tensor::HostBuffer`].
pub trait HostStorage: ParamStorage {
    /// The bytes.
    fn bytes(&self) -> &[u8];
    /// The bytes, writable.
    fn bytes_mut(&mut self) -> &mut [u8];
}

impl ParamStorage for [u8] {
    fn byte_len(&self) -> usize {
        self.len()
    }
}

impl HostStorage for [u8] {
    fn bytes(&self) -> &[u8] {
        self
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        self
    }
}

impl ParamStorage for Vec<u8> {
    fn byte_len(&self) -> usize {
        self.len()
    }
}

impl HostStorage for Vec<u8> {
    fn bytes(&self) -> &[u8] {
        self
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        self
    }
}

impl ParamStorage for &mut [u8] {
    fn byte_len(&self) -> usize {
        self.len()
    }
}

impl HostStorage for &mut [u8] {
    fn bytes(&self) -> &[u8] {
        self
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        self
    }
}

impl ParamStorage for moeshift_tensor::HostBuffer {
    fn byte_len(&self) -> usize {
        self.len()
    }
}

impl HostStorage for moeshift_tensor::HostBuffer {
    fn bytes(&self) -> &[u8] {
        self.as_slice()
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl<T: ParamStorage + ?Sized> ParamStorage for Box<T> {
    fn byte_len(&self) -> usize {
        (**self).byte_len()
    }
}

impl<T: HostStorage + ?Sized> HostStorage for Box<T> {
    fn bytes(&self) -> &[u8] {
        (**self).bytes()
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        (**self).bytes_mut()
    }
}

/// Why a registration or an update was refused. Messages name the parameter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// The name is registered already.
    #[error("parameter '{name}' is registered twice")]
    Duplicate {
        /// The name.
        name: String,
    },
    /// The memory does not match the parameter's byte length.
    #[error("parameter {param}: its memory holds {got} bytes, the parameter needs {expected}")]
    StorageSize {
        /// The parameter, described.
        param: String,
        /// `numel · dtype size`.
        expected: usize,
        /// Bytes of memory given.
        got: usize,
    },
    /// An update names a parameter the worker did not register.
    #[error("the update lists parameter '{name}' (position {position}), which this worker did not register")]
    Unknown {
        /// The name.
        name: String,
        /// Position in the update.
        position: usize,
    },
    /// An update's dtype for a parameter differs from the registration.
    #[error("parameter '{name}' is registered as {registered}, but the update sends {update}")]
    DType {
        /// The name.
        name: String,
        /// Registered dtype.
        registered: String,
        /// Dtype in the update.
        update: String,
    },
    /// An update's shape for a parameter differs from the registration.
    #[error("parameter '{name}' is registered with shape {registered:?}, but the update sends {update:?}")]
    Shape {
        /// The name.
        name: String,
        /// Registered shape.
        registered: Vec<usize>,
        /// Shape in the update.
        update: Vec<usize>,
    },
    /// Dense bytes for a parameter have the wrong length.
    #[error("dense values for parameter '{name}': expected {expected} bytes, got {got}")]
    DenseLength {
        /// The name.
        name: String,
        /// Bytes the parameter needs.
        expected: usize,
        /// Bytes given.
        got: usize,
    },
    /// A slot number that no registered parameter has.
    #[error("no registered parameter has slot {slot} (the registry holds {len})")]
    Slot {
        /// The slot.
        slot: usize,
        /// Parameters registered.
        len: usize,
    },
    /// A sparse patch failed validation.
    #[error(transparent)]
    Patch(#[from] PatchError),
}

/// One registered parameter: its metadata and its memory.
#[derive(Debug)]
pub struct Registered<S> {
    meta: ParamMeta,
    storage: S,
}

impl<S> Registered<S> {
    /// Name, dtype and shape.
    pub fn meta(&self) -> &ParamMeta {
        &self.meta
    }
    /// The memory.
    pub fn storage(&self) -> &S {
        &self.storage
    }
}

/// The parameters a worker accepts updates for, by name, in registration order.
///
/// ```
/// use moeshift_tensor::DType;
/// use moeshift_weight_transfer::{ParamMeta, ParamRegistry};
///
/// let mut reg: ParamRegistry<Vec<u8>> = ParamRegistry::new();
/// reg.register(ParamMeta::new("w", DType::F32, vec![2])?, vec![0u8; 8])?;
/// let slot = reg.check(&[ParamMeta::new("w", DType::F32, vec![2])?])?[0];
/// reg.apply_dense(&[(slot, &[0, 0, 128, 63, 0, 0, 0, 64])])?; // [1.0, 2.0]
/// assert_eq!(reg.bytes("w").unwrap()[3], 63);
/// // A shape that differs from the registration is refused before anything is written.
/// assert!(reg.check(&[ParamMeta::new("w", DType::F32, vec![3])?]).is_err());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct ParamRegistry<S> {
    params: Vec<Registered<S>>,
    by_name: HashMap<String, usize>,
}

impl<S> Default for ParamRegistry<S> {
    fn default() -> Self {
        Self {
            params: Vec::new(),
            by_name: HashMap::new(),
        }
    }
}

impl<S: ParamStorage> ParamRegistry<S> {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a parameter with its memory, which must be exactly `meta.byte_len()` bytes.
    /// Returns its slot (registration position).
    pub fn register(&mut self, meta: ParamMeta, storage: S) -> Result<usize, RegistryError> {
        if self.by_name.contains_key(meta.name()) {
            return Err(RegistryError::Duplicate {
                name: meta.name().to_string(),
            });
        }
        if storage.byte_len() != meta.byte_len() {
            return Err(RegistryError::StorageSize {
                param: meta.describe(),
                expected: meta.byte_len(),
                got: storage.byte_len(),
            });
        }
        let slot = self.params.len();
        self.by_name.insert(meta.name().to_string(), slot);
        self.params.push(Registered { meta, storage });
        Ok(slot)
    }

    /// Number of registered parameters.
    pub fn len(&self) -> usize {
        self.params.len()
    }

    /// True when nothing is registered.
    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    /// The registered parameters in registration order.
    pub fn iter(&self) -> impl Iterator<Item = &Registered<S>> {
        self.params.iter()
    }

    /// The parameter registered under `name`.
    pub fn get(&self, name: &str) -> Option<&Registered<S>> {
        self.by_name.get(name).and_then(|&i| self.params.get(i))
    }

    /// Metadata of every parameter, in registration order (what a trainer would send for a
    /// full dense update).
    pub fn metadata(&self) -> Vec<ParamMeta> {
        self.params.iter().map(|p| p.meta.clone()).collect()
    }

    /// Checks an update's metadata against the registrations and returns each parameter's
    /// slot. The first unknown name, dtype difference or shape difference is an error.
    pub fn check(&self, params: &[ParamMeta]) -> Result<Vec<usize>, RegistryError> {
        params
            .iter()
            .enumerate()
            .map(|(position, p)| {
                let slot = *self
                    .by_name
                    .get(p.name())
                    .ok_or_else(|| RegistryError::Unknown {
                        name: p.name().to_string(),
                        position,
                    })?;
                let reg = self.entry(slot)?;
                if reg.meta.dtype() != p.dtype() {
                    return Err(RegistryError::DType {
                        name: p.name().to_string(),
                        registered: reg.meta.dtype().name().to_string(),
                        update: p.dtype().name().to_string(),
                    });
                }
                if reg.meta.shape() != p.shape() {
                    return Err(RegistryError::Shape {
                        name: p.name().to_string(),
                        registered: reg.meta.shape().to_vec(),
                        update: p.shape().to_vec(),
                    });
                }
                Ok(slot)
            })
            .collect()
    }

    fn entry(&self, slot: usize) -> Result<&Registered<S>, RegistryError> {
        self.params.get(slot).ok_or(RegistryError::Slot {
            slot,
            len: self.params.len(),
        })
    }

    /// The memory of the parameter in `slot`, writable (for engines that write through
    /// their own path, e.g. device memory).
    pub fn storage_mut(&mut self, slot: usize) -> Result<&mut S, RegistryError> {
        let len = self.params.len();
        self.params
            .get_mut(slot)
            .map(|p| &mut p.storage)
            .ok_or(RegistryError::Slot { slot, len })
    }

    /// The memory of the parameters in `slots` (distinct), writable at once, in the order
    /// of `slots`.
    pub fn storages_mut(&mut self, slots: &[usize]) -> Result<Vec<&mut S>, RegistryError> {
        let len = self.params.len();
        let mut all: Vec<Option<&mut S>> = self
            .params
            .iter_mut()
            .map(|p| Some(&mut p.storage))
            .collect();
        slots
            .iter()
            .map(|&slot| {
                all.get_mut(slot)
                    .and_then(Option::take)
                    .ok_or(RegistryError::Slot { slot, len })
            })
            .collect()
    }

    /// Metadata of the parameter in `slot`.
    pub fn meta(&self, slot: usize) -> Result<&ParamMeta, RegistryError> {
        self.entry(slot).map(|p| &p.meta)
    }
}

impl<S: HostStorage> ParamRegistry<S> {
    /// The current bytes of parameter `name`.
    pub fn bytes(&self, name: &str) -> Option<&[u8]> {
        self.get(name).map(|p| p.storage.bytes())
    }

    /// Overwrites whole parameters: `(slot, bytes)` pairs. Every slot and length is checked
    /// first; on error nothing is written.
    pub fn apply_dense(&mut self, writes: &[(usize, &[u8])]) -> Result<(), RegistryError> {
        for &(slot, data) in writes {
            let meta = &self.entry(slot)?.meta;
            if data.len() != meta.byte_len() {
                return Err(RegistryError::DenseLength {
                    name: meta.name().to_string(),
                    expected: meta.byte_len(),
                    got: data.len(),
                });
            }
        }
        for &(slot, data) in writes {
            if let Some(p) = self.params.get_mut(slot) {
                p.storage.bytes_mut().copy_from_slice(data);
            }
        }
        Ok(())
    }

    /// Applies sparse patches in place, in order. Every patch is validated against its
    /// registered parameter first (known name, same dtype, one value per index, indices in
    /// range); on error nothing is written.
    pub fn apply_patches(&mut self, patches: &[SparsePatch]) -> Result<(), RegistryError> {
        let mut slots = Vec::with_capacity(patches.len());
        for (position, patch) in patches.iter().enumerate() {
            let slot =
                *self
                    .by_name
                    .get(patch.name.as_str())
                    .ok_or_else(|| RegistryError::Unknown {
                        name: patch.name.clone(),
                        position,
                    })?;
            patch.validate_for(&self.entry(slot)?.meta)?;
            slots.push(slot);
        }
        for (patch, slot) in patches.iter().zip(slots) {
            if let Some(p) = self.params.get_mut(slot) {
                patch.write_validated(p.storage.bytes_mut());
            }
        }
        Ok(())
    }

    /// SHA-256 over every parameter in registration order: its name and its bytes, each
    /// length-prefixed. Two workers with equal digests hold the same bits under the same
    /// names.
    pub fn digest(&self) -> Digest {
        let mut h = Hasher::new();
        for p in &self.params {
            h.update_framed(p.meta.name().as_bytes());
            h.update_framed(p.storage.bytes());
        }
        h.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moeshift_tensor::DType;

    fn meta(name: &str, dtype: DType, shape: Vec<usize>) -> ParamMeta {
        ParamMeta::new(name, dtype, shape).unwrap()
    }

    fn registry() -> ParamRegistry<Vec<u8>> {
        let mut r = ParamRegistry::new();
        r.register(meta("w", DType::F32, vec![2, 2]), vec![0; 16])
            .unwrap();
        r.register(meta("b", DType::Bf16, vec![2]), vec![1; 4])
            .unwrap();
        r
    }

    #[test]
    fn registration_rules() {
        let mut r = registry();
        assert_eq!(r.len(), 2);
        assert!(matches!(
            r.register(meta("w", DType::F32, vec![1]), vec![0; 4]),
            Err(RegistryError::Duplicate { .. })
        ));
        let err = r
            .register(meta("x", DType::F32, vec![3]), vec![0; 8])
            .unwrap_err();
        assert!(matches!(
            err,
            RegistryError::StorageSize {
                expected: 12,
                got: 8,
                ..
            }
        ));
        assert!(err.to_string().contains("'x'"));
    }

    #[test]
    fn check_rejects_unknown_dtype_and_shape() {
        let r = registry();
        assert_eq!(
            r.check(&[
                meta("b", DType::Bf16, vec![2]),
                meta("w", DType::F32, vec![2, 2])
            ])
            .unwrap(),
            vec![1, 0]
        );
        let err = r.check(&[meta("nope", DType::F32, vec![1])]).unwrap_err();
        assert!(matches!(err, RegistryError::Unknown { position: 0, .. }));
        assert!(err.to_string().contains("'nope'"));
        let err = r.check(&[meta("w", DType::F16, vec![2, 2])]).unwrap_err();
        assert!(err.to_string().contains("float16") && err.to_string().contains("'w'"));
        let err = r.check(&[meta("w", DType::F32, vec![4])]).unwrap_err();
        assert!(matches!(err, RegistryError::Shape { .. }), "{err}");
    }

    #[test]
    fn dense_writes_are_all_or_nothing() {
        let mut r = registry();
        let before = r.digest();
        let err = r
            .apply_dense(&[(0, &[7u8; 16]), (1, &[7u8; 3])])
            .unwrap_err();
        assert!(matches!(
            err,
            RegistryError::DenseLength {
                expected: 4,
                got: 3,
                ..
            }
        ));
        assert_eq!(r.digest(), before);
        assert!(matches!(
            r.apply_dense(&[(0, &[7u8; 16]), (9, &[])]),
            Err(RegistryError::Slot { slot: 9, .. })
        ));
        assert_eq!(r.digest(), before);
        r.apply_dense(&[(0, &[7u8; 16]), (1, &[8u8; 4])]).unwrap();
        assert_eq!(r.bytes("w"), Some(&[7u8; 16][..]));
        assert_eq!(r.bytes("b"), Some(&[8u8; 4][..]));
    }

    #[test]
    fn patches_are_validated_before_any_write() {
        let mut r = registry();
        let before = r.digest();
        let good =
            SparsePatch::new("w", DType::F32, vec![3], 1.5f32.to_le_bytes().to_vec()).unwrap();
        let out_of_range = SparsePatch::new("b", DType::Bf16, vec![2], vec![0, 0]).unwrap();
        let err = r.apply_patches(&[good.clone(), out_of_range]).unwrap_err();
        assert!(matches!(
            err,
            RegistryError::Patch(PatchError::IndexOutOfRange {
                index: 2,
                numel: 2,
                ..
            })
        ));
        assert_eq!(
            r.digest(),
            before,
            "the good patch must not have been applied"
        );
        let wrong_dtype = SparsePatch::new("b", DType::F32, vec![0], vec![0; 4]).unwrap();
        assert!(matches!(
            r.apply_patches(&[good.clone(), wrong_dtype]),
            Err(RegistryError::Patch(PatchError::DTypeMismatch { .. }))
        ));
        let unknown = SparsePatch::new("zz", DType::F32, vec![0], vec![0; 4]).unwrap();
        assert!(matches!(
            r.apply_patches(&[good.clone(), unknown]),
            Err(RegistryError::Unknown { position: 1, .. })
        ));
        assert_eq!(r.digest(), before);
        r.apply_patches(&[good]).unwrap();
        assert_eq!(&r.bytes("w").unwrap()[12..], &1.5f32.to_le_bytes());
    }

    #[test]
    fn several_storages_at_once() {
        let mut r = registry();
        {
            let mut both = r.storages_mut(&[1, 0]).unwrap();
            assert_eq!(both[0].len(), 4);
            assert_eq!(both[1].len(), 16);
            both[0][0] = 9;
        }
        assert_eq!(r.bytes("b").unwrap()[0], 9);
        assert!(matches!(
            r.storages_mut(&[0, 0]),
            Err(RegistryError::Slot { slot: 0, .. })
        ));
        assert!(matches!(
            r.storages_mut(&[2]),
            Err(RegistryError::Slot { slot: 2, len: 2 })
        ));
    }

    #[test]
    fn mixed_storage_kinds_through_boxes() {
        let mut backing = vec![0u8; 4];
        {
            let mut r: ParamRegistry<Box<dyn HostStorage + '_>> = ParamRegistry::new();
            r.register(meta("owned", DType::U8, vec![2]), Box::new(vec![0u8; 2]))
                .unwrap();
            r.register(
                meta("borrowed", DType::F32, vec![1]),
                Box::new(&mut backing[..]),
            )
            .unwrap();
            r.apply_dense(&[(1, &2.0f32.to_le_bytes())]).unwrap();
        }
        assert_eq!(backing, 2.0f32.to_le_bytes());
    }

    #[test]
    fn digest_depends_on_names_and_bytes() {
        let a = registry();
        let mut b = registry();
        assert_eq!(a.digest(), b.digest());
        b.apply_dense(&[(1, &[1, 1, 1, 2])]).unwrap();
        assert_ne!(a.digest(), b.digest());
    }
}
