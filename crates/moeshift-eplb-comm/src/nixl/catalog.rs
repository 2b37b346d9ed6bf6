//! What each rank publishes about itself when a NIXL communicator is built: its agent's
//! name and metadata, and for every (layer, tensor) the layout peers must agree on plus
//! where the rows are (base address, row stride, device), so a peer can compute the address
//! of any expert row and READ it.
//!
//! Descriptions travel through the rendezvous store as one blob per rank. A rank whose own
//! setup failed publishes its reason instead, so its peers fail at once naming it rather
//! than waiting for it until their deadline.

use moeshift_tensor::Device;

use crate::error::EplbCommError;
use crate::weights::{LayerLayout, LayerWeights};
use crate::wire::{Reader, Writer};

/// Tag and version of the blob.
const TAG: &[u8] = b"moeshift-eplb-nixl-v1";

/// Where one tensor's rows are on the rank that owns them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TensorPlace {
    /// Address of row 0.
    pub(crate) base: u64,
    /// Bytes from one row's start to the next's.
    pub(crate) row_stride: u64,
    /// The shape of one row (the tensor's dims after dim 0).
    pub(crate) row_shape: Vec<usize>,
}

impl TensorPlace {
    /// Address of row `row` (callers check `row` against the layer's rows).
    pub(crate) fn row_addr(&self, row: usize) -> u64 {
        self.base
            .saturating_add((row as u64).saturating_mul(self.row_stride))
    }

    /// First byte past the last of `rows` rows of `row_bytes` each: the span to register.
    pub(crate) fn span(&self, rows: usize, row_bytes: usize) -> u64 {
        if rows == 0 || row_bytes == 0 {
            return 0;
        }
        ((rows as u64 - 1).saturating_mul(self.row_stride)).saturating_add(row_bytes as u64)
    }
}

/// One layer as a rank holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LayerPlace {
    /// What ranks must agree on.
    pub(crate) layout: LayerLayout,
    /// Where the layer's memory lives.
    pub(crate) device: Device,
    /// Per tensor, in layout order.
    pub(crate) tensors: Vec<TensorPlace>,
}

impl LayerPlace {
    /// The description of `weights`.
    pub(crate) fn of(weights: &LayerWeights<'_>) -> Self {
        Self {
            layout: weights.layout(),
            device: weights.device(),
            tensors: weights
                .tensors()
                .iter()
                .map(|t| TensorPlace {
                    base: t.view().data_addr(),
                    row_stride: t.rows().row_stride_bytes() as u64,
                    row_shape: t.view().shape().get(1..).unwrap_or(&[]).to_vec(),
                })
                .collect(),
        }
    }

    /// The first difference between this layer (as registered) and `weights` (as passed
    /// now): layout, device, addresses or strides. `None` when they are the same memory.
    pub(crate) fn difference_from(&self, weights: &LayerWeights<'_>) -> Option<String> {
        let now = Self::of(weights);
        if let Some((tensor, detail)) = self.layout.first_difference(&now.layout) {
            let which = tensor
                .map(|t| format!("tensor {t:?}: "))
                .unwrap_or_default();
            return Some(format!("{which}{detail} (registered, then passed)"));
        }
        if self.device != now.device {
            return Some(format!(
                "registered on {}, passed on {}",
                self.device, now.device
            ));
        }
        for ((spec, a), b) in self
            .layout
            .tensors
            .iter()
            .zip(&self.tensors)
            .zip(&now.tensors)
        {
            if a != b {
                return Some(format!(
                    "tensor {:?}: registered at {:#x} (row stride {}, row shape {:?}), passed at \
                     {:#x} (row stride {}, row shape {:?})",
                    spec.name, a.base, a.row_stride, a.row_shape, b.base, b.row_stride, b.row_shape
                ));
            }
        }
        None
    }

    fn encode(&self, w: &mut Writer) {
        self.layout.encode(w);
        encode_device(w, self.device);
        w.usize(self.tensors.len());
        for t in &self.tensors {
            w.u64(t.base).u64(t.row_stride).usize(t.row_shape.len());
            for &d in &t.row_shape {
                w.usize(d);
            }
        }
    }

    fn decode(r: &mut Reader<'_>) -> Option<Self> {
        let layout = LayerLayout::decode(r)?;
        let device = decode_device(r)?;
        let n = r.usize()?;
        if n != layout.tensors.len() {
            return None;
        }
        let mut tensors = Vec::new();
        for _ in 0..n {
            let base = r.u64()?;
            let row_stride = r.u64()?;
            let dims = r.usize()?;
            let mut row_shape = Vec::new();
            for _ in 0..dims {
                row_shape.push(r.usize()?);
            }
            tensors.push(TensorPlace {
                base,
                row_stride,
                row_shape,
            });
        }
        Some(Self {
            layout,
            device,
            tensors,
        })
    }
}

fn encode_device(w: &mut Writer, device: Device) {
    match device {
        Device::Host => w.u8(0).usize(0),
        Device::Cuda(ordinal) => w.u8(1).usize(ordinal),
    };
}

fn decode_device(r: &mut Reader<'_>) -> Option<Device> {
    match (r.u8()?, r.usize()?) {
        (0, _) => Some(Device::Host),
        (1, ordinal) => Some(Device::Cuda(ordinal)),
        _ => None,
    }
}

/// Everything a rank publishes about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RankDescription {
    /// Its NIXL agent's name.
    pub(crate) agent: String,
    /// Its NIXL agent's metadata (connection info and memory keys).
    pub(crate) metadata: Vec<u8>,
    /// Its layers.
    pub(crate) layers: Vec<LayerPlace>,
}

/// What one rank published: its description, or why it could not set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Published {
    /// Ready, with this description.
    Ready(RankDescription),
    /// Setup failed on that rank for this reason.
    Failed(String),
}

impl Published {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(1024);
        w.bytes(TAG);
        match self {
            Published::Failed(reason) => {
                w.u8(1).bytes(reason.as_bytes());
            }
            Published::Ready(d) => {
                w.u8(0)
                    .bytes(d.agent.as_bytes())
                    .bytes(&d.metadata)
                    .usize(d.layers.len());
                for l in &d.layers {
                    l.encode(&mut w);
                }
            }
        }
        w.finish()
    }

    /// `None` for anything that is not exactly a blob of this version.
    pub(crate) fn decode(bytes: &[u8]) -> Option<Self> {
        let mut r = Reader::new(bytes);
        if r.bytes()? != TAG {
            return None;
        }
        let out = match r.u8()? {
            1 => Published::Failed(String::from_utf8_lossy(r.bytes()?).into_owned()),
            0 => {
                let agent = String::from_utf8(r.bytes()?.to_vec()).ok()?;
                let metadata = r.bytes()?.to_vec();
                let n = r.usize()?;
                let mut layers = Vec::new();
                for _ in 0..n {
                    layers.push(LayerPlace::decode(&mut r)?);
                }
                Published::Ready(RankDescription {
                    agent,
                    metadata,
                    layers,
                })
            }
            _ => return None,
        };
        r.is_empty().then_some(out)
    }
}

/// Checks that peer `peer` holds the same tensors as this rank `rank` in every layer:
/// number of layers, rows per rank, tensor names, dtypes, bytes per row and row shapes.
/// The error names both ranks, the layer and the tensor.
pub(crate) fn check_same_tensors(
    rank: usize,
    ours: &[LayerPlace],
    peer: usize,
    theirs: &[LayerPlace],
) -> Result<(), EplbCommError> {
    let mismatch = |layer, tensor, detail| EplbCommError::LayoutMismatch {
        rank,
        peer,
        layer,
        tensor,
        detail,
    };
    if ours.len() != theirs.len() {
        return Err(mismatch(
            None,
            None,
            format!("{} layers here, {} there", ours.len(), theirs.len()),
        ));
    }
    for (layer, (a, b)) in ours.iter().zip(theirs).enumerate() {
        if let Some((tensor, detail)) = a.layout.first_difference(&b.layout) {
            return Err(mismatch(Some(layer), tensor, detail));
        }
        for ((spec, x), y) in a.layout.tensors.iter().zip(&a.tensors).zip(&b.tensors) {
            if x.row_shape != y.row_shape {
                return Err(mismatch(
                    Some(layer),
                    Some(spec.name.clone()),
                    format!("row shape {:?} here, {:?} there", x.row_shape, y.row_shape),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::TensorSpec;
    use moeshift_tensor::{DType, HostBuffer};

    fn place(dtype: DType, row_shape: Vec<usize>) -> LayerPlace {
        LayerPlace {
            layout: LayerLayout {
                rows: 4,
                tensors: vec![
                    TensorSpec {
                        name: "w13".into(),
                        dtype: DType::Bf16,
                        row_bytes: 64,
                    },
                    TensorSpec {
                        name: "w2".into(),
                        dtype,
                        row_bytes: 32,
                    },
                ],
            },
            device: Device::Cuda(3),
            tensors: vec![
                TensorPlace {
                    base: 0x7000_0000,
                    row_stride: 64,
                    row_shape: vec![4, 8],
                },
                TensorPlace {
                    base: 0x7100_0000,
                    row_stride: 48,
                    row_shape,
                },
            ],
        }
    }

    #[test]
    fn descriptions_roundtrip_and_reject_garbage() {
        let d = Published::Ready(RankDescription {
            agent: "eplb-1-0123abcd".into(),
            metadata: vec![1, 2, 3, 250],
            layers: vec![place(DType::F32, vec![8]), place(DType::F16, vec![4, 4])],
        });
        let bytes = d.encode();
        assert_eq!(Published::decode(&bytes), Some(d));
        assert_eq!(Published::decode(&bytes[..bytes.len() - 1]), None);
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(Published::decode(&longer), None);
        assert_eq!(Published::decode(b"something else"), None);
        let f = Published::Failed("no UCX plugin".into());
        assert_eq!(Published::decode(&f.encode()), Some(f));
    }

    #[test]
    fn row_addresses_and_spans() {
        let t = TensorPlace {
            base: 0x1000,
            row_stride: 48,
            row_shape: vec![8],
        };
        assert_eq!(t.row_addr(0), 0x1000);
        assert_eq!(t.row_addr(3), 0x1000 + 144);
        // 4 rows of 32 bytes, 48 apart: the last row ends at 3·48 + 32.
        assert_eq!(t.span(4, 32), 176);
        assert_eq!(t.span(0, 32), 0);
        assert_eq!(t.span(4, 0), 0);
    }

    #[test]
    fn tensor_differences_name_layer_and_tensor() {
        let ours = vec![place(DType::F32, vec![8]), place(DType::F32, vec![8])];
        assert!(check_same_tensors(0, &ours, 1, &ours.clone()).is_ok());
        // Same bytes per row, another dtype in layer 1.
        let theirs = vec![place(DType::F32, vec![8]), place(DType::I32, vec![8])];
        let err = check_same_tensors(0, &ours, 2, &theirs).unwrap_err();
        let text = err.to_string();
        for part in [
            "rank 0",
            "peer rank 2",
            "layer 1",
            "\"w2\"",
            "float32",
            "int32",
        ] {
            assert!(text.contains(part), "{part:?} missing in {text}");
        }
        // Same dtype and bytes, rows shaped differently.
        let theirs = vec![place(DType::F32, vec![2, 4]), place(DType::F32, vec![8])];
        let text = check_same_tensors(3, &ours, 0, &theirs)
            .unwrap_err()
            .to_string();
        for part in ["rank 3", "peer rank 0", "layer 0", "\"w2\"", "[2, 4]"] {
            assert!(text.contains(part), "{part:?} missing in {text}");
        }
        // A different number of layers.
        let text = check_same_tensors(0, &ours, 1, &ours[..1])
            .unwrap_err()
            .to_string();
        assert!(text.contains("2 layers here, 1 there"), "{text}");
    }

    #[test]
    fn registered_weights_are_recognised_and_changes_reported() {
        let mut a = HostBuffer::zeroed(4 * 8 * 2).unwrap();
        let mut b = HostBuffer::zeroed(4 * 8 * 2).unwrap();
        let registered = {
            let w = LayerWeights::builder()
                .host("w", &mut a, &[4, 8], DType::Bf16)
                .unwrap()
                .build()
                .unwrap();
            LayerPlace::of(&w)
        };
        let same = LayerWeights::builder()
            .host("w", &mut a, &[4, 8], DType::Bf16)
            .unwrap()
            .build()
            .unwrap();
        assert_eq!(registered.difference_from(&same), None);
        drop(same);
        let moved = LayerWeights::builder()
            .host("w", &mut b, &[4, 8], DType::Bf16)
            .unwrap()
            .build()
            .unwrap();
        let detail = registered.difference_from(&moved).unwrap();
        assert!(
            detail.contains("\"w\"") && detail.contains("registered at"),
            "{detail}"
        );
        drop(moved);
        let reshaped = LayerWeights::builder()
            .host("w", &mut a, &[4, 2, 4], DType::Bf16)
            .unwrap()
            .build()
            .unwrap();
        let detail = registered.difference_from(&reshaped).unwrap();
        assert!(detail.contains("[2, 4]"), "{detail}");
    }
}
