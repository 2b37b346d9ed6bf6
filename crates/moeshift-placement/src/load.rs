//! Per-layer logical expert loads, validated once at construction.

use serde::Serialize;

/// Why a load matrix was rejected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The load has no layer at all.
    #[error("load has no layers")]
    NoLayers,
    /// Layer 0 has no expert, so the number of logical experts is zero.
    #[error("load has no logical experts (layer 0 is empty)")]
    NoExperts,
    /// A layer's row does not have as many experts as layer 0.
    #[error(
        "load row of layer {layer} has {found} experts, expected {expected} (the width of layer 0)"
    )]
    RaggedRow {
        /// Layer whose row has the wrong width.
        layer: usize,
        /// Width of layer 0.
        expected: usize,
        /// Width of this layer.
        found: usize,
    },
    /// A flat buffer does not hold `layers × experts` values.
    #[error(
        "flat load has {found} values, expected {expected} ({layers} layers x {experts} experts)"
    )]
    FlatLength {
        /// Number of layers asked for.
        layers: usize,
        /// Number of experts asked for.
        experts: usize,
        /// `layers × experts`.
        expected: usize,
        /// Length of the buffer.
        found: usize,
    },
    /// A value is negative, NaN, infinite, or too large for `f32`.
    #[error(
        "load of layer {layer}, expert {expert} is {value}: loads must be finite, non-negative \
         and fit in f32"
    )]
    InvalidValue {
        /// Layer of the value.
        layer: usize,
        /// Logical expert of the value.
        expert: usize,
        /// The offending value, as given.
        value: f64,
    },
}

/// Logical load of every expert in every layer: `L × N` non-negative finite `f32` values.
///
/// Row `l` holds the tokens (or any additive weight) routed to each logical expert of layer `l`.
/// Values are `f32` because the DeepSeek-compatible policy works in `f32`, as DeepSeek's
/// reference does. A `-0.0` is stored as `0.0`, so that ordering by value is the numeric one.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoadMatrix {
    layers: usize,
    experts: usize,
    data: Vec<f32>,
}

impl LoadMatrix {
    /// Builds a load from one row per layer.
    ///
    /// # Errors
    /// [`LoadError`] when there is no layer or no expert, when rows differ in width, or when a
    /// value is negative, NaN or infinite (the error names the layer and expert).
    pub fn from_rows<R: AsRef<[f32]>>(rows: &[R]) -> Result<Self, LoadError> {
        let experts = Self::check_shape(rows.iter().map(|r| r.as_ref().len()))?;
        let mut data = Vec::with_capacity(rows.len() * experts);
        for (layer, row) in rows.iter().enumerate() {
            for (expert, &v) in row.as_ref().iter().enumerate() {
                data.push(check_value(layer, expert, f64::from(v), v)?);
            }
        }
        Ok(Self {
            layers: rows.len(),
            experts,
            data,
        })
    }

    /// Builds a load from `f64` rows (e.g. parsed JSON), converting every value to `f32`.
    ///
    /// # Errors
    /// As [`LoadMatrix::from_rows`]; a value that overflows `f32` is rejected too.
    pub fn from_f64_rows<R: AsRef<[f64]>>(rows: &[R]) -> Result<Self, LoadError> {
        let experts = Self::check_shape(rows.iter().map(|r| r.as_ref().len()))?;
        let mut data = Vec::with_capacity(rows.len() * experts);
        for (layer, row) in rows.iter().enumerate() {
            for (expert, &v) in row.as_ref().iter().enumerate() {
                // `as` rounds to nearest and saturates to infinity on overflow, which the check
                // below rejects.
                data.push(check_value(layer, expert, v, v as f32)?);
            }
        }
        Ok(Self {
            layers: rows.len(),
            experts,
            data,
        })
    }

    /// Builds a load from a row-major `layers × experts` buffer.
    ///
    /// # Errors
    /// [`LoadError`] for a zero dimension, a wrong buffer length or an invalid value.
    pub fn from_flat(layers: usize, experts: usize, mut data: Vec<f32>) -> Result<Self, LoadError> {
        if layers == 0 {
            return Err(LoadError::NoLayers);
        }
        if experts == 0 {
            return Err(LoadError::NoExperts);
        }
        let expected = layers.saturating_mul(experts);
        if data.len() != expected {
            return Err(LoadError::FlatLength {
                layers,
                experts,
                expected,
                found: data.len(),
            });
        }
        for (i, v) in data.iter_mut().enumerate() {
            *v = check_value(i / experts, i % experts, f64::from(*v), *v)?;
        }
        Ok(Self {
            layers,
            experts,
            data,
        })
    }

    fn check_shape(mut widths: impl Iterator<Item = usize>) -> Result<usize, LoadError> {
        let experts = widths.next().ok_or(LoadError::NoLayers)?;
        if experts == 0 {
            return Err(LoadError::NoExperts);
        }
        for (i, found) in widths.enumerate() {
            if found != experts {
                return Err(LoadError::RaggedRow {
                    layer: i + 1,
                    expected: experts,
                    found,
                });
            }
        }
        Ok(experts)
    }

    /// Number of layers `L`.
    pub fn num_layers(&self) -> usize {
        self.layers
    }

    /// Number of logical experts `N`.
    pub fn num_experts(&self) -> usize {
        self.experts
    }

    /// The loads of one layer, or `None` when `layer ≥ L`.
    pub fn layer(&self, layer: usize) -> Option<&[f32]> {
        let start = layer.checked_mul(self.experts)?;
        self.data.get(start..start + self.experts)
    }

    /// Iterates over the layers' rows.
    pub fn rows(&self) -> impl ExactSizeIterator<Item = &[f32]> + '_ {
        self.data.chunks_exact(self.experts)
    }

    /// The whole matrix, row-major.
    pub fn as_flat(&self) -> &[f32] {
        &self.data
    }
}

fn check_value(layer: usize, expert: usize, given: f64, stored: f32) -> Result<f32, LoadError> {
    // NaN fails `is_finite`, and -0.0 passes `>= 0.0`.
    if !given.is_finite() || given < 0.0 || !stored.is_finite() {
        return Err(LoadError::InvalidValue {
            layer,
            expert,
            value: given,
        });
    }
    // Adding +0.0 turns -0.0 into +0.0 and leaves every other value unchanged.
    Ok(stored + 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_kept_in_order() {
        let load = LoadMatrix::from_rows(&[vec![1.0f32, 2.0], vec![3.0, 4.0]]).unwrap();
        assert_eq!(load.num_layers(), 2);
        assert_eq!(load.num_experts(), 2);
        assert_eq!(load.layer(1), Some(&[3.0f32, 4.0][..]));
        assert_eq!(load.layer(2), None);
        assert_eq!(load.rows().count(), 2);
        assert_eq!(load.as_flat(), &[1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn empty_and_ragged_inputs_are_rejected() {
        let none: [Vec<f32>; 0] = [];
        assert_eq!(LoadMatrix::from_rows(&none), Err(LoadError::NoLayers));
        assert_eq!(
            LoadMatrix::from_rows(&[Vec::<f32>::new()]),
            Err(LoadError::NoExperts)
        );
        assert_eq!(
            LoadMatrix::from_rows(&[vec![1.0f32, 2.0], vec![3.0]]),
            Err(LoadError::RaggedRow {
                layer: 1,
                expected: 2,
                found: 1
            })
        );
        assert!(matches!(
            LoadMatrix::from_flat(2, 3, vec![0.0; 5]),
            Err(LoadError::FlatLength {
                expected: 6,
                found: 5,
                ..
            })
        ));
    }

    #[test]
    fn invalid_values_name_layer_and_expert() {
        for bad in [-1.0f32, f32::NAN, f32::INFINITY] {
            let err = LoadMatrix::from_rows(&[vec![1.0, 2.0], vec![3.0, bad]]).unwrap_err();
            assert!(
                matches!(
                    err,
                    LoadError::InvalidValue {
                        layer: 1,
                        expert: 1,
                        ..
                    }
                ),
                "{err}"
            );
            let msg = err.to_string();
            assert!(msg.contains("layer 1") && msg.contains("expert 1"), "{msg}");
        }
        // Finite in f64, infinite once converted to f32.
        let err = LoadMatrix::from_f64_rows(&[vec![1e39f64]]).unwrap_err();
        assert!(matches!(err, LoadError::InvalidValue { value, .. } if value == 1e39));
    }

    #[test]
    fn negative_zero_becomes_positive_zero() {
        let load = LoadMatrix::from_rows(&[vec![-0.0f32, 1.0]]).unwrap();
        assert!(load.as_flat()[0].is_sign_positive());
        let load = LoadMatrix::from_flat(1, 1, vec![-0.0]).unwrap();
        assert!(load.as_flat()[0].is_sign_positive());
    }
}
