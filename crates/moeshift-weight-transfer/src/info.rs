//! [`UpdateInfo`]: the description of one weight update (which parameters, their dtypes and
//! shapes, dense or sparse, packed or not), its validation, its JSON form, and its
//! resolution against the worker's previous metadata.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use moeshift_tensor::DType;
use serde::{Deserialize, Serialize};

use crate::meta::{MetaError, ParamMeta};

/// How the values of an update travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum UpdateKind {
    /// Every element of every listed parameter (JSON `"dense"`).
    #[default]
    Dense,
    /// Per parameter, flat int32 indices and the new values at those indices (JSON
    /// `"sparse_flat"`).
    SparseFlat,
}

impl UpdateKind {
    /// The JSON spelling: `"dense"` or `"sparse_flat"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dense => "dense",
            Self::SparseFlat => "sparse_flat",
        }
    }
}

impl fmt::Display for UpdateKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for UpdateKind {
    type Err = InfoError;

    fn from_str(s: &str) -> Result<Self, InfoError> {
        match s {
            "dense" => Ok(Self::Dense),
            "sparse_flat" => Ok(Self::SparseFlat),
            other => Err(InfoError::UnsupportedKind {
                kind: other.to_string(),
            }),
        }
    }
}

impl Serialize for UpdateKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for UpdateKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Why an [`UpdateInfo`] is invalid. Each message says what is wrong and names the field and,
/// where there is one, the parameter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InfoError {
    /// `update_kind` is neither `dense` nor `sparse_flat`.
    #[error("Unsupported update_kind '{kind}': expected 'dense' or 'sparse_flat'")]
    UnsupportedKind {
        /// The kind as given.
        kind: String,
    },
    /// A dense update carries `num_updates_list`.
    #[error(
        "Sparse metadata is only supported for update_kind='sparse_flat': \
         num_updates_list ({len} entries) was given with update_kind='dense'"
    )]
    SparseMetadataOnDense {
        /// Entries in the list.
        len: usize,
    },
    /// A sparse update has no `num_updates_list`.
    #[error("num_updates_list is required for sparse updates (update_kind='sparse_flat')")]
    MissingNumUpdates,
    /// A sparse update has an empty `num_updates_list`.
    #[error("num_updates_list cannot be empty for update_kind='sparse_flat'")]
    EmptyNumUpdates,
    /// An entry of `num_updates_list` is negative.
    #[error("num_updates_list[{index}] = {value} must be non-negative")]
    NegativeNumUpdates {
        /// Position in the list.
        index: usize,
        /// The entry.
        value: i64,
    },
    /// `num_updates_list` and `names` differ in length.
    #[error(
        "num_updates_list has {len} entries; it should be of the same size as names ({names} entries)"
    )]
    NumUpdatesLength {
        /// Entries in `num_updates_list`.
        len: usize,
        /// Entries in `names`.
        names: usize,
    },
    /// A sparse update asks for packed transfer.
    #[error("update_kind='sparse_flat' cannot be combined with packed=True")]
    SparsePacked,
    /// `dtype_names` or `shapes` differs in length from `names`.
    #[error("{field} has {len} entries but names has {names}: they must have the same length")]
    FieldLength {
        /// `"dtype_names"` or `"shapes"`.
        field: &'static str,
        /// Entries in that field.
        len: usize,
        /// Entries in `names`.
        names: usize,
    },
    /// A name is empty.
    #[error("names[{index}] is empty")]
    EmptyName {
        /// Position in `names`.
        index: usize,
    },
    /// A name appears twice.
    #[error("parameter '{name}' appears twice in names (positions {first} and {second})")]
    DuplicateName {
        /// The name.
        name: String,
        /// First position.
        first: usize,
        /// Second position.
        second: usize,
    },
    /// A dtype name is not one moeshift knows.
    #[error("dtype_names[{index}] = '{dtype}' (parameter '{name}') is not a known dtype")]
    UnknownDType {
        /// Position.
        index: usize,
        /// The parameter.
        name: String,
        /// The dtype name as given.
        dtype: String,
    },
    /// A dimension is negative.
    #[error("shapes[{index}] = {shape:?} (parameter '{name}') has a negative dimension {value}")]
    NegativeDim {
        /// Position.
        index: usize,
        /// The parameter.
        name: String,
        /// The whole shape.
        shape: Vec<i64>,
        /// The negative dimension.
        value: i64,
    },
    /// An entry of `num_updates_list` exceeds the parameter's element count.
    #[error(
        "num_updates_list[{index}] = {value} for parameter '{name}' exceeds its {numel} elements"
    )]
    TooManyUpdates {
        /// Position.
        index: usize,
        /// The parameter.
        name: String,
        /// The entry.
        value: i64,
        /// Elements of the parameter.
        numel: usize,
    },
    /// A shape's size overflows.
    #[error("shapes[{index}]: {source}")]
    Shape {
        /// Position.
        index: usize,
        /// The overflow.
        #[source]
        source: MetaError,
    },
    /// A dense update with empty lists asks to reuse metadata this worker does not have.
    #[error(
        "a dense update with empty names, dtype_names and shapes reuses the previous metadata, \
         but no earlier dense update was received"
    )]
    NoPreviousMetadata,
    /// The JSON text is not an update info.
    #[error("update info JSON is invalid: {detail}")]
    Json {
        /// serde_json's description (line, column, what).
        detail: String,
    },
}

/// The description of one weight update, as the trainer sends it (field names and JSON
/// spelling follow the `update_kind` contract; see the crate docs).
///
/// Building one does not validate it; [`UpdateInfo::validate`], [`UpdateInfo::from_json`]
/// and [`UpdateInfo::resolve`] do.
///
/// ```
/// use moeshift_weight_transfer::{UpdateInfo, UpdateKind};
///
/// let info = UpdateInfo::from_json(
///     r#"{"names": ["layer.weight", "layer.bias"],
///         "dtype_names": ["float32", "bfloat16"],
///         "shapes": [[10, 10], [10]],
///         "update_kind": "sparse_flat",
///         "num_updates_list": [4, 2]}"#,
/// )?;
/// assert_eq!(info.update_kind, UpdateKind::SparseFlat);
/// assert!(!info.packed);
/// # Ok::<(), moeshift_weight_transfer::InfoError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateInfo {
    /// Parameter names, in transfer order.
    pub names: Vec<String>,
    /// PyTorch dtype names (`"bfloat16"`, `"float32"`, …), one per name.
    pub dtype_names: Vec<String>,
    /// Shapes, one per name.
    pub shapes: Vec<Vec<i64>>,
    /// Dense or sparse (`"dense"` when absent).
    #[serde(default)]
    pub update_kind: UpdateKind,
    /// For sparse updates, the number of (index, value) entries per parameter.
    #[serde(default)]
    pub num_updates_list: Option<Vec<i64>>,
    /// Dense values travel packed in chunks (see [`crate::packing`]).
    #[serde(default)]
    pub packed: bool,
}

/// The JSON shape before `update_kind` is checked, so an unknown kind becomes
/// [`InfoError::UnsupportedKind`] rather than a generic serde message.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInfo {
    names: Vec<String>,
    dtype_names: Vec<String>,
    shapes: Vec<Vec<i64>>,
    #[serde(default)]
    update_kind: Option<String>,
    #[serde(default)]
    num_updates_list: Option<Vec<i64>>,
    #[serde(default)]
    packed: bool,
}

impl UpdateInfo {
    /// A dense update of `params`.
    pub fn dense(params: &[ParamMeta], packed: bool) -> Self {
        let mut info = Self::lists(params);
        info.packed = packed;
        info
    }

    /// A dense update that reuses the previous metadata (all lists empty).
    pub fn dense_reuse(packed: bool) -> Self {
        Self {
            packed,
            ..Self::default()
        }
    }

    /// A sparse update of `params`, with `num_updates[i]` entries for `params[i]`.
    pub fn sparse(params: &[ParamMeta], num_updates: &[usize]) -> Self {
        let mut info = Self::lists(params);
        info.update_kind = UpdateKind::SparseFlat;
        info.num_updates_list = Some(
            num_updates
                .iter()
                .map(|&n| i64::try_from(n).unwrap_or(i64::MAX))
                .collect(),
        );
        info
    }

    fn lists(params: &[ParamMeta]) -> Self {
        Self {
            names: params.iter().map(|p| p.name().to_string()).collect(),
            dtype_names: params
                .iter()
                .map(|p| p.dtype().name().to_string())
                .collect(),
            shapes: params
                .iter()
                .map(|p| {
                    p.shape()
                        .iter()
                        .map(|&d| i64::try_from(d).unwrap_or(i64::MAX))
                        .collect()
                })
                .collect(),
            ..Self::default()
        }
    }

    /// Parses and validates JSON. An unknown `update_kind` is
    /// [`InfoError::UnsupportedKind`]; other malformed JSON is [`InfoError::Json`].
    pub fn from_json(text: &str) -> Result<Self, InfoError> {
        let raw: RawInfo = serde_json::from_str(text).map_err(|e| InfoError::Json {
            detail: e.to_string(),
        })?;
        let update_kind = match raw.update_kind {
            Some(kind) => kind.parse()?,
            None => UpdateKind::Dense,
        };
        let info = Self {
            names: raw.names,
            dtype_names: raw.dtype_names,
            shapes: raw.shapes,
            update_kind,
            num_updates_list: raw.num_updates_list,
            packed: raw.packed,
        };
        info.validate()?;
        Ok(info)
    }

    /// The JSON form (`update_kind` as `"dense"` / `"sparse_flat"`).
    pub fn to_json(&self) -> String {
        // Serializing plain strings, integers and booleans cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// True for a dense update whose lists are all empty: "reuse the previous metadata".
    pub fn is_reuse(&self) -> bool {
        self.update_kind == UpdateKind::Dense
            && self.names.is_empty()
            && self.dtype_names.is_empty()
            && self.shapes.is_empty()
    }

    /// Checks every rule that does not need the worker's previous metadata. Rules apply in
    /// this order, and the first broken one is reported:
    ///
    /// 1. dense with `num_updates_list` → [`InfoError::SparseMetadataOnDense`];
    /// 2. sparse without it, with it empty, with a negative entry, or with a length other
    ///    than `names` → [`InfoError::MissingNumUpdates`], [`InfoError::EmptyNumUpdates`],
    ///    [`InfoError::NegativeNumUpdates`], [`InfoError::NumUpdatesLength`];
    /// 3. sparse with `packed` → [`InfoError::SparsePacked`];
    /// 4. `dtype_names` / `shapes` length ≠ `names` → [`InfoError::FieldLength`];
    /// 5. per parameter in order: empty or repeated name, unknown dtype name, negative
    ///    dimension, size overflow, more sparse entries than elements.
    pub fn validate(&self) -> Result<(), InfoError> {
        self.check_kind()?;
        if self.is_reuse() {
            return Ok(());
        }
        self.params().map(|_| ())
    }

    fn check_kind(&self) -> Result<(), InfoError> {
        match self.update_kind {
            UpdateKind::Dense => {
                if let Some(list) = &self.num_updates_list {
                    return Err(InfoError::SparseMetadataOnDense { len: list.len() });
                }
            }
            UpdateKind::SparseFlat => {
                let list = self
                    .num_updates_list
                    .as_ref()
                    .ok_or(InfoError::MissingNumUpdates)?;
                if list.is_empty() {
                    return Err(InfoError::EmptyNumUpdates);
                }
                if let Some((index, &value)) = list.iter().enumerate().find(|(_, &v)| v < 0) {
                    return Err(InfoError::NegativeNumUpdates { index, value });
                }
                if list.len() != self.names.len() {
                    return Err(InfoError::NumUpdatesLength {
                        len: list.len(),
                        names: self.names.len(),
                    });
                }
                if self.packed {
                    return Err(InfoError::SparsePacked);
                }
            }
        }
        for (field, len) in [
            ("dtype_names", self.dtype_names.len()),
            ("shapes", self.shapes.len()),
        ] {
            if len != self.names.len() {
                return Err(InfoError::FieldLength {
                    field,
                    len,
                    names: self.names.len(),
                });
            }
        }
        Ok(())
    }

    /// The per-parameter checks (rule 5), producing typed metadata.
    fn params(&self) -> Result<Vec<ParamMeta>, InfoError> {
        let mut seen: HashMap<&str, usize> = HashMap::with_capacity(self.names.len());
        let mut out = Vec::with_capacity(self.names.len());
        let rows = self.names.iter().zip(&self.dtype_names).zip(&self.shapes);
        for (index, ((name, dtype_name), shape)) in rows.enumerate() {
            if name.is_empty() {
                return Err(InfoError::EmptyName { index });
            }
            if let Some(&first) = seen.get(name.as_str()) {
                return Err(InfoError::DuplicateName {
                    name: name.clone(),
                    first,
                    second: index,
                });
            }
            seen.insert(name, index);
            let dtype = DType::parse(dtype_name)
                .ok()
                .ok_or_else(|| InfoError::UnknownDType {
                    index,
                    name: name.clone(),
                    dtype: dtype_name.clone(),
                })?;
            let mut dims = Vec::with_capacity(shape.len());
            for &value in shape {
                let dim = usize::try_from(value).map_err(|_| InfoError::NegativeDim {
                    index,
                    name: name.clone(),
                    shape: shape.clone(),
                    value,
                })?;
                dims.push(dim);
            }
            let meta = ParamMeta::new(name.clone(), dtype, dims)
                .map_err(|source| InfoError::Shape { index, source })?;
            if let Some(&value) = self.num_updates_list.as_ref().and_then(|l| l.get(index)) {
                let fits = usize::try_from(value).is_ok_and(|n| n <= meta.numel());
                if !fits {
                    return Err(InfoError::TooManyUpdates {
                        index,
                        name: name.clone(),
                        value,
                        numel: meta.numel(),
                    });
                }
            }
            out.push(meta);
        }
        Ok(out)
    }

    /// Validates and turns the lists into typed metadata. A reuse update (see
    /// [`UpdateInfo::is_reuse`]) takes `previous`, the metadata of the last dense update this
    /// worker accepted; with none it is [`InfoError::NoPreviousMetadata`].
    pub fn resolve(&self, previous: Option<&[ParamMeta]>) -> Result<ResolvedUpdate, InfoError> {
        self.check_kind()?;
        let (params, reused) = if self.is_reuse() {
            let prev = previous.ok_or(InfoError::NoPreviousMetadata)?;
            (prev.to_vec(), true)
        } else {
            (self.params()?, false)
        };
        let num_updates = match (&self.update_kind, &self.num_updates_list) {
            (UpdateKind::SparseFlat, Some(list)) => list
                .iter()
                .map(|&v| usize::try_from(v).unwrap_or(0))
                .collect(),
            _ => Vec::new(),
        };
        Ok(ResolvedUpdate {
            kind: self.update_kind,
            packed: self.packed,
            params,
            num_updates,
            reused,
        })
    }
}

/// A validated update with typed metadata: what a worker engine receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUpdate {
    /// Dense or sparse.
    pub kind: UpdateKind,
    /// Dense values travel packed.
    pub packed: bool,
    /// The parameters, in transfer order.
    pub params: Vec<ParamMeta>,
    /// For sparse updates, entries per parameter (same length as `params`); empty for dense.
    pub num_updates: Vec<usize>,
    /// The metadata came from the previous update rather than from the info's lists.
    pub reused: bool,
}

impl ResolvedUpdate {
    /// Bytes of payload this update carries: Σ byte lengths for dense, Σ entries·(4 + dtype
    /// size) for sparse (int32 indices plus values). Saturates instead of overflowing.
    pub fn payload_bytes(&self) -> usize {
        match self.kind {
            UpdateKind::Dense => self
                .params
                .iter()
                .fold(0usize, |acc, p| acc.saturating_add(p.byte_len())),
            UpdateKind::SparseFlat => self
                .params
                .iter()
                .zip(&self.num_updates)
                .fold(0usize, |acc, (p, &n)| {
                    acc.saturating_add(n.saturating_mul(4 + p.dtype().size_bytes()))
                }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// The dense NCCL vector: `w1` float32 [100, 100], `w2` bfloat16 [50].
    fn dense_w1_w2() -> UpdateInfo {
        UpdateInfo {
            names: names(&["w1", "w2"]),
            dtype_names: names(&["float32", "bfloat16"]),
            shapes: vec![vec![100, 100], vec![50]],
            ..UpdateInfo::default()
        }
    }

    /// The sparse MVP vector: `layer.weight` float32 [10, 10] with 4 entries, `layer.bias`
    /// bfloat16 [10] with 2.
    fn sparse_layer() -> UpdateInfo {
        UpdateInfo {
            names: names(&["layer.weight", "layer.bias"]),
            dtype_names: names(&["float32", "bfloat16"]),
            shapes: vec![vec![10, 10], vec![10]],
            update_kind: UpdateKind::SparseFlat,
            num_updates_list: Some(vec![4, 2]),
            packed: false,
        }
    }

    #[test]
    fn dense_vector_is_valid() {
        let info = dense_w1_w2();
        info.validate().unwrap();
        let r = info.resolve(None).unwrap();
        assert_eq!(r.params.len(), 2);
        assert_eq!(r.params[0].dtype(), DType::F32);
        assert_eq!(r.params[1].dtype(), DType::Bf16);
        assert_eq!(r.params[0].shape(), &[100, 100]);
        assert_eq!(r.payload_bytes(), 100 * 100 * 4 + 50 * 2);
        assert!(!r.reused);
    }

    #[test]
    fn dense_length_mismatch_names_the_field() {
        let mut info = dense_w1_w2();
        info.dtype_names.pop();
        let err = info.validate().unwrap_err();
        assert_eq!(
            err,
            InfoError::FieldLength {
                field: "dtype_names",
                len: 1,
                names: 2
            }
        );
        assert!(err.to_string().contains("dtype_names"), "{err}");

        let mut info = dense_w1_w2();
        info.shapes.push(vec![1]);
        let err = info.validate().unwrap_err();
        assert!(matches!(
            err,
            InfoError::FieldLength {
                field: "shapes",
                len: 3,
                names: 2
            }
        ));
        assert!(err.to_string().contains("shapes"), "{err}");
    }

    #[test]
    fn empty_dense_lists_mean_reuse() {
        let info = UpdateInfo::dense_reuse(false);
        assert!(info.is_reuse());
        info.validate().unwrap();
        assert_eq!(info.resolve(None), Err(InfoError::NoPreviousMetadata));
        let prev = dense_w1_w2().resolve(None).unwrap().params;
        let r = info.resolve(Some(&prev)).unwrap();
        assert!(r.reused);
        assert_eq!(r.params, prev);
    }

    #[test]
    fn sparse_vector_is_valid() {
        let info = sparse_layer();
        info.validate().unwrap();
        let r = info.resolve(None).unwrap();
        assert_eq!(r.kind, UpdateKind::SparseFlat);
        assert_eq!(r.num_updates, vec![4, 2]);
        // 4 entries of int32 + float32, 2 entries of int32 + bfloat16.
        assert_eq!(r.payload_bytes(), 4 * 8 + 2 * 6);
    }

    #[test]
    fn unknown_kind_from_json_is_typed() {
        let text = r#"{"names":[],"dtype_names":[],"shapes":[],"update_kind":"sparse_coo"}"#;
        let err = UpdateInfo::from_json(text).unwrap_err();
        assert_eq!(
            err,
            InfoError::UnsupportedKind {
                kind: "sparse_coo".into()
            }
        );
        assert!(err.to_string().contains("Unsupported update_kind"), "{err}");
        // Through serde directly, the same message appears inside serde's error.
        let serde_err = serde_json::from_str::<UpdateInfo>(text).unwrap_err();
        assert!(
            serde_err
                .to_string()
                .contains("Unsupported update_kind 'sparse_coo'"),
            "{serde_err}"
        );
        assert!(matches!(
            "nope".parse::<UpdateKind>(),
            Err(InfoError::UnsupportedKind { .. })
        ));
    }

    #[test]
    fn dense_with_num_updates_is_rejected() {
        let mut info = dense_w1_w2();
        info.num_updates_list = Some(vec![1, 1]);
        let err = info.validate().unwrap_err();
        assert_eq!(err, InfoError::SparseMetadataOnDense { len: 2 });
        assert!(err
            .to_string()
            .contains("only supported for update_kind='sparse_flat'"));
        // Even an empty list is sparse metadata on a dense update.
        let mut info = UpdateInfo::dense_reuse(false);
        info.num_updates_list = Some(vec![]);
        assert_eq!(
            info.validate(),
            Err(InfoError::SparseMetadataOnDense { len: 0 })
        );
    }

    #[test]
    fn sparse_list_rules() {
        let mut missing = sparse_layer();
        missing.num_updates_list = None;
        let err = missing.validate().unwrap_err();
        assert_eq!(err, InfoError::MissingNumUpdates);
        assert!(err.to_string().contains("is required for sparse updates"));

        let mut empty = sparse_layer();
        empty.num_updates_list = Some(vec![]);
        let err = empty.validate().unwrap_err();
        assert_eq!(err, InfoError::EmptyNumUpdates);
        assert!(err.to_string().contains("cannot be empty"));

        let mut negative = sparse_layer();
        negative.num_updates_list = Some(vec![4, -1]);
        let err = negative.validate().unwrap_err();
        assert_eq!(
            err,
            InfoError::NegativeNumUpdates {
                index: 1,
                value: -1
            }
        );
        assert!(err.to_string().contains("must be non-negative"));

        // The sparse NCCL vector: [3] with two names.
        let mut short = sparse_layer();
        short.num_updates_list = Some(vec![3]);
        let err = short.validate().unwrap_err();
        assert_eq!(err, InfoError::NumUpdatesLength { len: 1, names: 2 });
        assert!(err
            .to_string()
            .contains("should be of the same size as names"));

        // The sparse NCCL vector: [-1] (with one name).
        let mut one = sparse_layer();
        one.names.truncate(1);
        one.dtype_names.truncate(1);
        one.shapes.truncate(1);
        one.num_updates_list = Some(vec![-1]);
        assert!(matches!(
            one.validate(),
            Err(InfoError::NegativeNumUpdates {
                index: 0,
                value: -1
            })
        ));
    }

    #[test]
    fn sparse_with_packed_is_rejected() {
        let mut info = sparse_layer();
        info.packed = true;
        let err = info.validate().unwrap_err();
        assert_eq!(err, InfoError::SparsePacked);
        assert!(err
            .to_string()
            .contains("cannot be combined with packed=True"));
    }

    #[test]
    fn sparse_field_lengths_are_checked_too() {
        let mut info = sparse_layer();
        info.shapes.pop();
        assert!(matches!(
            info.validate(),
            Err(InfoError::FieldLength {
                field: "shapes",
                ..
            })
        ));
    }

    #[test]
    fn unknown_dtype_is_quoted() {
        let mut info = dense_w1_w2();
        info.dtype_names[1] = "bfloat17".into();
        let err = info.validate().unwrap_err();
        assert!(matches!(err, InfoError::UnknownDType { index: 1, .. }));
        let text = err.to_string();
        assert!(
            text.contains("'bfloat17'") && text.contains("'w2'"),
            "{text}"
        );
    }

    #[test]
    fn negative_dim_is_rejected() {
        let mut info = dense_w1_w2();
        info.shapes[0] = vec![100, -3];
        let err = info.validate().unwrap_err();
        assert!(matches!(
            err,
            InfoError::NegativeDim {
                index: 0,
                value: -3,
                ..
            }
        ));
        assert!(err.to_string().contains("'w1'"), "{err}");
    }

    #[test]
    fn empty_and_duplicate_names_are_rejected() {
        let mut info = dense_w1_w2();
        info.names[1] = "w1".into();
        assert!(matches!(
            info.validate(),
            Err(InfoError::DuplicateName {
                first: 0,
                second: 1,
                ..
            })
        ));
        info.names[1] = String::new();
        assert_eq!(info.validate(), Err(InfoError::EmptyName { index: 1 }));
    }

    #[test]
    fn more_entries_than_elements_is_rejected() {
        let mut info = sparse_layer();
        info.num_updates_list = Some(vec![4, 11]);
        assert!(matches!(
            info.validate(),
            Err(InfoError::TooManyUpdates {
                index: 1,
                value: 11,
                numel: 10,
                ..
            })
        ));
    }

    #[test]
    fn json_round_trip_uses_the_contract_names() {
        for info in [dense_w1_w2(), sparse_layer(), UpdateInfo::dense_reuse(true)] {
            let text = info.to_json();
            assert_eq!(UpdateInfo::from_json(&text).unwrap(), info);
            let value: serde_json::Value = serde_json::from_str(&text).unwrap();
            for field in [
                "names",
                "dtype_names",
                "shapes",
                "update_kind",
                "num_updates_list",
                "packed",
            ] {
                assert!(value.get(field).is_some(), "{field} missing in {text}");
            }
        }
        let text = sparse_layer().to_json();
        assert!(text.contains(r#""update_kind":"sparse_flat""#), "{text}");
        assert!(dense_w1_w2().to_json().contains(r#""update_kind":"dense""#));
    }

    #[test]
    fn json_defaults_and_garbage() {
        let info =
            UpdateInfo::from_json(r#"{"names":["w"],"dtype_names":["float32"],"shapes":[[2]]}"#)
                .unwrap();
        assert_eq!(info.update_kind, UpdateKind::Dense);
        assert_eq!(info.num_updates_list, None);
        assert!(!info.packed);
        assert!(matches!(
            UpdateInfo::from_json("{"),
            Err(InfoError::Json { .. })
        ));
        assert!(matches!(
            UpdateInfo::from_json(r#"{"names":[],"dtype_names":[],"shapes":[],"extra":1}"#),
            Err(InfoError::Json { .. })
        ));
        // Validation runs on parse.
        assert!(matches!(
            UpdateInfo::from_json(
                r#"{"names":["w"],"dtype_names":["float32"],"shapes":[[2]],"update_kind":"sparse_flat"}"#
            ),
            Err(InfoError::MissingNumUpdates)
        ));
    }

    #[test]
    fn constructors_produce_valid_infos() {
        let params = dense_w1_w2().resolve(None).unwrap().params;
        assert_eq!(UpdateInfo::dense(&params, false), dense_w1_w2());
        let s = UpdateInfo::sparse(&params, &[7, 0]);
        s.validate().unwrap();
        assert_eq!(s.num_updates_list, Some(vec![7, 0]));
    }
}
