//! [`LayerWeights`]: all expert tensors of one MoE layer on this rank, validated together.
//!
//! A layer's expert weights are several tensors (e.g. `w13`, `w2`, and scales when
//! quantized), each shaped `[local_experts, ...]`: dim 0 is the expert row. Moving an
//! expert means moving its row of every tensor. [`LayerWeights`] checks once what every
//! backend relies on:
//!
//! * every tensor's dim 0 is the outermost dense row dimension, so row `i` is one byte range
//!   ([`ExpertRows`]; transposed or column-major views are refused even when weakly
//!   contiguous);
//! * all tensors have the same number of rows and live on the same device;
//! * tensor names are unique, and no two rows of the layer share a byte.
//!
//! Host weights are built safely from borrowed [`HostBuffer`]s; the borrow lasts as long as
//! the `LayerWeights`, so nothing else can touch the bytes while a transfer reads them or a
//! commit writes them. Memory the process cannot borrow (device memory, memory owned by
//! another runtime) comes in through the `unsafe` constructor
//! [`LayerWeightsBuilder::raw`], whose contract the caller upholds.

use std::marker::PhantomData;

use moeshift_tensor::{DType, Device, ExpertRows, HostBuffer, TensorView};

use crate::error::EplbCommError;
use crate::wire::{Reader, Writer};

#[allow(unsafe_code)]
mod memory;

/// What ranks must agree on about one tensor of a layer: its name, dtype and bytes per
/// expert row.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TensorSpec {
    /// Name (unique within the layer), e.g. `"w13"`.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Bytes in one expert row.
    pub row_bytes: usize,
}

/// The shape of one layer's expert weights as every rank must see it: rows per rank and
/// the tensors in order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LayerLayout {
    /// Expert rows (local physical experts) per rank.
    pub rows: usize,
    /// The tensors, in order.
    pub tensors: Vec<TensorSpec>,
}

impl LayerLayout {
    /// Bytes of one expert across all tensors (`Σ row_bytes`).
    pub fn expert_bytes(&self) -> usize {
        self.tensors
            .iter()
            .fold(0usize, |n, t| n.saturating_add(t.row_bytes))
    }

    /// The first difference between `self` (here) and `other` (there), as
    /// `(tensor concerned, description)`; `None` when they are equal.
    pub fn first_difference(&self, other: &LayerLayout) -> Option<(Option<String>, String)> {
        if self.rows != other.rows {
            return Some((
                None,
                format!(
                    "{} expert rows per rank here, {} there",
                    self.rows, other.rows
                ),
            ));
        }
        if self.tensors.len() != other.tensors.len() {
            let names =
                |l: &LayerLayout| l.tensors.iter().map(|t| t.name.clone()).collect::<Vec<_>>();
            return Some((
                None,
                format!(
                    "{} tensors here {:?}, {} there {:?}",
                    self.tensors.len(),
                    names(self),
                    other.tensors.len(),
                    names(other)
                ),
            ));
        }
        for (i, (a, b)) in self.tensors.iter().zip(&other.tensors).enumerate() {
            if a.name != b.name {
                return Some((
                    Some(a.name.clone()),
                    format!("tensor {i} is named {:?} here, {:?} there", a.name, b.name),
                ));
            }
            if a.dtype != b.dtype {
                return Some((
                    Some(a.name.clone()),
                    format!("dtype {} here, {} there", a.dtype, b.dtype),
                ));
            }
            if a.row_bytes != b.row_bytes {
                return Some((
                    Some(a.name.clone()),
                    format!(
                        "{} bytes per expert row here, {} there",
                        a.row_bytes, b.row_bytes
                    ),
                ));
            }
        }
        None
    }

    pub(crate) fn encode(&self, w: &mut Writer) {
        w.usize(self.rows).usize(self.tensors.len());
        for t in &self.tensors {
            w.bytes(t.name.as_bytes())
                .bytes(t.dtype.name().as_bytes())
                .usize(t.row_bytes);
        }
    }

    pub(crate) fn decode(r: &mut Reader<'_>) -> Option<Self> {
        let rows = r.usize()?;
        let n = r.usize()?;
        let mut tensors = Vec::new();
        for _ in 0..n {
            let name = String::from_utf8(r.bytes()?.to_vec()).ok()?;
            let dtype = DType::parse(std::str::from_utf8(r.bytes()?).ok()?).ok()?;
            let row_bytes = r.usize()?;
            tensors.push(TensorSpec {
                name,
                dtype,
                row_bytes,
            });
        }
        Some(Self { rows, tensors })
    }
}

/// One expert tensor of a layer: its name, view and row addressing.
#[derive(Debug)]
pub struct ExpertTensor {
    name: String,
    view: TensorView,
    rows: ExpertRows,
    /// Row 0 (the view's first element). For host memory it carries the provenance of the
    /// borrowed buffer; for device memory it is never dereferenced on the host.
    base: *mut u8,
}

impl ExpertTensor {
    /// The tensor's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The view it was built from.
    pub fn view(&self) -> &TensorView {
        &self.view
    }

    /// Row addressing: `row_addr(i)` is where expert row `i` starts (a host or device
    /// address), `row_bytes()` its size.
    pub fn rows(&self) -> &ExpertRows {
        &self.rows
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.view.dtype()
    }

    /// Where the memory lives.
    pub fn device(&self) -> Device {
        self.view.device()
    }

    /// Bytes in one expert row.
    pub fn row_bytes(&self) -> usize {
        self.rows.row_bytes()
    }

    /// What ranks must agree on about this tensor.
    pub fn spec(&self) -> TensorSpec {
        TensorSpec {
            name: self.name.clone(),
            dtype: self.dtype(),
            row_bytes: self.row_bytes(),
        }
    }
}

/// All expert tensors of one layer on this rank. See the [module documentation](self).
///
/// ```
/// use moeshift_eplb_comm::LayerWeights;
/// use moeshift_tensor::{DType, HostBuffer};
///
/// // 4 local experts: w13 is [4, 16, 8] bf16, w2 is [4, 8, 8] bf16.
/// let mut w13 = HostBuffer::zeroed(4 * 16 * 8 * 2)?;
/// let mut w2 = HostBuffer::zeroed(4 * 8 * 8 * 2)?;
/// let mut weights = LayerWeights::builder()
///     .host("w13", &mut w13, &[4, 16, 8], DType::Bf16)?
///     .host("w2", &mut w2, &[4, 8, 8], DType::Bf16)?
///     .build()?;
/// assert_eq!(weights.num_rows(), 4);
/// assert_eq!(weights.layout().expert_bytes(), 16 * 8 * 2 + 8 * 8 * 2);
/// weights.row_mut(1, 3)?.fill(7);
/// assert!(weights.row(1, 3)?.iter().all(|&b| b == 7));
///
/// // A transposed view is weakly contiguous, but its "rows" are columns: refused.
/// let mut bad = HostBuffer::zeroed(4 * 8 * 4)?;
/// let t = bad.view(&[8, 4], DType::F32)?.t()?;
/// assert!(LayerWeights::builder().host_view("w", &mut bad, t).is_err());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct LayerWeights<'a> {
    tensors: Vec<ExpertTensor>,
    rows: usize,
    device: Device,
    _borrow: PhantomData<&'a mut [u8]>,
}

/// Collects the tensors of a [`LayerWeights`]; see [`LayerWeights::builder`].
#[derive(Debug)]
pub struct LayerWeightsBuilder<'a> {
    tensors: Vec<ExpertTensor>,
    _borrow: PhantomData<&'a mut [u8]>,
}

impl<'a> LayerWeightsBuilder<'a> {
    /// Adds the tensor `name`: the start of `buffer` viewed as a contiguous `shape` of
    /// `dtype` (dim 0 = expert row). The buffer stays borrowed by the weights.
    pub fn host(
        self,
        name: &str,
        buffer: &'a mut HostBuffer,
        shape: &[usize],
        dtype: DType,
    ) -> Result<Self, EplbCommError> {
        let view = buffer
            .view(shape, dtype)
            .map_err(|source| EplbCommError::View {
                tensor: name.to_string(),
                source,
            })?;
        self.host_view(name, buffer, view)
    }

    /// Adds the tensor `name`: any view into `buffer` whose dim 0 is the outermost dense
    /// row dimension (rows may be strided, e.g. a column slice `x[:, a:b]` of a row-major
    /// tensor). The view's storage must lie inside the buffer.
    pub fn host_view(
        self,
        name: &str,
        buffer: &'a mut HostBuffer,
        view: TensorView,
    ) -> Result<Self, EplbCommError> {
        let outside = |detail: String| EplbCommError::OutsideBuffer {
            tensor: name.to_string(),
            detail,
        };
        if view.device() != Device::Host {
            return Err(outside(format!(
                "the view is on {}, not on the host",
                view.device()
            )));
        }
        let storage = view.storage();
        let buf_start = buffer.addr();
        let buf_end = buf_start.saturating_add(buffer.len() as u64);
        let storage_end = u64::try_from(view.storage_nbytes())
            .ok()
            .and_then(|n| storage.addr.checked_add(n));
        match storage_end {
            Some(end) if storage.addr >= buf_start && end <= buf_end => {}
            _ => {
                return Err(outside(format!(
                    "storage at {:#x} of {} bytes, buffer at {buf_start:#x} of {} bytes",
                    storage.addr,
                    view.storage_nbytes(),
                    buffer.len()
                )))
            }
        }
        let offset = usize::try_from(view.data_addr().saturating_sub(buf_start))
            .map_err(|_| outside("offset does not fit in usize".into()))?;
        // In bounds: the view's first element lies inside its storage, inside the buffer
        // (an empty view may sit at its storage's end, which `wrapping_add` also allows).
        let base = buffer.as_mut_ptr().wrapping_add(offset);
        self.push(name, view, base)
    }

    fn push(mut self, name: &str, view: TensorView, base: *mut u8) -> Result<Self, EplbCommError> {
        let rows = view
            .expert_rows()
            .map_err(|source| EplbCommError::NotExpertRows {
                tensor: name.to_string(),
                source,
            })?;
        self.tensors.push(ExpertTensor {
            name: name.to_string(),
            view,
            rows,
            base,
        });
        Ok(self)
    }

    /// Checks the tensors together (see the [module documentation](self)) and returns the
    /// layer.
    pub fn build(self) -> Result<LayerWeights<'a>, EplbCommError> {
        let first = self.tensors.first().ok_or(EplbCommError::NoTensors)?;
        let (rows, device) = (first.rows.num_rows(), first.device());
        for (i, t) in self.tensors.iter().enumerate() {
            if self.tensors[..i].iter().any(|o| o.name == t.name) {
                return Err(EplbCommError::DuplicateTensor {
                    tensor: t.name.clone(),
                });
            }
            if t.rows.num_rows() != rows {
                return Err(EplbCommError::RowCountMismatch {
                    tensor: t.name.clone(),
                    rows: t.rows.num_rows(),
                    first: first.name.clone(),
                    expected: rows,
                });
            }
            if t.device() != device {
                return Err(EplbCommError::DeviceMismatch {
                    tensor: t.name.clone(),
                    device: t.device(),
                    first: first.name.clone(),
                    expected: device,
                });
            }
        }
        check_no_overlap(&self.tensors)?;
        Ok(LayerWeights {
            tensors: self.tensors,
            rows,
            device,
            _borrow: PhantomData,
        })
    }
}

/// Every non-empty row of every tensor is a byte range; no two may intersect.
fn check_no_overlap(tensors: &[ExpertTensor]) -> Result<(), EplbCommError> {
    let mut ranges: Vec<(u64, u64, usize, usize)> = Vec::new();
    for (ti, t) in tensors.iter().enumerate() {
        if t.row_bytes() == 0 {
            continue;
        }
        for row in 0..t.rows.num_rows() {
            if let Ok(r) = t.rows.row_range(row) {
                ranges.push((r.start, r.end, ti, row));
            }
        }
    }
    ranges.sort_unstable();
    let mut reach: Option<(u64, usize, usize)> = None;
    for &(start, end, ti, row) in &ranges {
        if let Some((max_end, oti, orow)) = reach {
            if start < max_end {
                let name = |i: usize| tensors.get(i).map(|t| t.name.clone()).unwrap_or_default();
                return Err(EplbCommError::OverlappingRows {
                    tensor: name(ti),
                    row,
                    other: name(oti),
                    other_row: orow,
                });
            }
        }
        if reach.is_none_or(|(max_end, _, _)| end > max_end) {
            reach = Some((end, ti, row));
        }
    }
    Ok(())
}

impl<'a> LayerWeights<'a> {
    /// Starts describing a layer.
    pub fn builder() -> LayerWeightsBuilder<'a> {
        LayerWeightsBuilder {
            tensors: Vec::new(),
            _borrow: PhantomData,
        }
    }

    /// Expert rows per tensor (local physical experts).
    pub fn num_rows(&self) -> usize {
        self.rows
    }

    /// Number of tensors.
    pub fn num_tensors(&self) -> usize {
        self.tensors.len()
    }

    /// The tensors, in the order they were added.
    pub fn tensors(&self) -> &[ExpertTensor] {
        &self.tensors
    }

    /// Tensor `index`.
    pub fn tensor(&self, index: usize) -> Result<&ExpertTensor, EplbCommError> {
        self.tensors
            .get(index)
            .ok_or(EplbCommError::TensorOutOfRange {
                index,
                tensors: self.tensors.len(),
            })
    }

    /// Where every tensor lives.
    pub fn device(&self) -> Device {
        self.device
    }

    /// What ranks must agree on about this layer.
    pub fn layout(&self) -> LayerLayout {
        LayerLayout {
            rows: self.rows,
            tensors: self.tensors.iter().map(ExpertTensor::spec).collect(),
        }
    }

    /// The bytes of row `row` of tensor `tensor` (host memory only).
    pub fn row(&self, tensor: usize, row: usize) -> Result<&[u8], EplbCommError> {
        self.tensor(tensor)?.host_row(row)
    }

    /// The bytes of row `row` of tensor `tensor`, writable (host memory only).
    pub fn row_mut(&mut self, tensor: usize, row: usize) -> Result<&mut [u8], EplbCommError> {
        let tensors = self.tensors.len();
        self.tensors
            .get_mut(tensor)
            .ok_or(EplbCommError::TensorOutOfRange {
                index: tensor,
                tensors,
            })?
            .host_row_mut(row)
    }

    /// Copies row `src` of tensor `tensor` over its row `dst` (host memory only).
    pub(crate) fn copy_row(
        &mut self,
        tensor: usize,
        src: usize,
        dst: usize,
    ) -> Result<(), EplbCommError> {
        let tensors = self.tensors.len();
        self.tensors
            .get_mut(tensor)
            .ok_or(EplbCommError::TensorOutOfRange {
                index: tensor,
                tensors,
            })?
            .copy_host_row(src, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_and_rows() {
        let mut a = HostBuffer::zeroed(3 * 10 * 4).unwrap();
        let mut b = HostBuffer::zeroed(3 * 6).unwrap();
        let mut w = LayerWeights::builder()
            .host("w13", &mut a, &[3, 10], DType::F32)
            .unwrap()
            .host("scale", &mut b, &[3, 6], DType::U8)
            .unwrap()
            .build()
            .unwrap();
        assert_eq!(w.num_rows(), 3);
        assert_eq!(w.num_tensors(), 2);
        assert_eq!(w.device(), Device::Host);
        let layout = w.layout();
        assert_eq!(layout.rows, 3);
        assert_eq!(layout.expert_bytes(), 40 + 6);
        assert_eq!(layout.tensors[1].name, "scale");
        w.row_mut(0, 2).unwrap().copy_from_slice(&[9u8; 40]);
        w.copy_row(0, 2, 0).unwrap();
        assert_eq!(w.row(0, 0).unwrap(), &[9u8; 40][..]);
        assert!(w.row(0, 1).unwrap().iter().all(|&x| x == 0));
        assert!(matches!(
            w.row(0, 3),
            Err(EplbCommError::TensorRowOutOfRange {
                row: 3,
                rows: 3,
                ..
            })
        ));
        assert!(matches!(
            w.row(2, 0),
            Err(EplbCommError::TensorOutOfRange {
                index: 2,
                tensors: 2
            })
        ));
        drop(w);
        // Row 2 of w13 holds 9s, row 0 holds the copy, row 1 is untouched.
        assert!(a.as_slice()[..40].iter().all(|&x| x == 9));
        assert!(a.as_slice()[40..80].iter().all(|&x| x == 0));
        assert!(a.as_slice()[80..].iter().all(|&x| x == 9));
    }

    #[test]
    fn strided_rows_write_only_their_bytes() {
        // x[:, 2:6] of a [4, 8] u8 matrix: rows of 4 bytes, 8 bytes apart.
        let mut buf = HostBuffer::zeroed(32).unwrap();
        let view = buf
            .view(&[4, 8], DType::U8)
            .unwrap()
            .narrow(1, 2, 4)
            .unwrap();
        let mut w = LayerWeights::builder()
            .host_view("x", &mut buf, view)
            .unwrap()
            .build()
            .unwrap();
        w.row_mut(0, 1).unwrap().fill(1);
        drop(w);
        let mut expected = [0u8; 32];
        expected[10..14].fill(1);
        assert_eq!(buf.as_slice(), &expected[..]);
    }

    #[test]
    fn invalid_layers_are_refused() {
        assert!(matches!(
            LayerWeights::builder().build(),
            Err(EplbCommError::NoTensors)
        ));
        let (mut a, mut b) = (
            HostBuffer::zeroed(64).unwrap(),
            HostBuffer::zeroed(64).unwrap(),
        );
        let err = LayerWeights::builder()
            .host("w", &mut a, &[4, 4], DType::U8)
            .unwrap()
            .host("w", &mut b, &[4, 4], DType::U8)
            .unwrap()
            .build()
            .unwrap_err();
        assert!(matches!(err, EplbCommError::DuplicateTensor { ref tensor } if tensor == "w"));
        let err = LayerWeights::builder()
            .host("w13", &mut a, &[4, 4], DType::U8)
            .unwrap()
            .host("w2", &mut b, &[2, 4], DType::U8)
            .unwrap()
            .build()
            .unwrap_err();
        assert!(
            matches!(
                err,
                EplbCommError::RowCountMismatch {
                    rows: 2,
                    expected: 4,
                    ..
                }
            ),
            "{err}"
        );
        // Transposed and column-major views are refused.
        let t = a.view(&[4, 4], DType::F32).unwrap().t().unwrap();
        let err = LayerWeights::builder()
            .host_view("t", &mut a, t)
            .unwrap_err();
        assert!(matches!(err, EplbCommError::NotExpertRows { .. }), "{err}");
        // A view of another buffer is refused.
        let other = b.view(&[4, 4], DType::U8).unwrap();
        let err = LayerWeights::builder()
            .host_view("o", &mut a, other)
            .unwrap_err();
        assert!(matches!(err, EplbCommError::OutsideBuffer { .. }), "{err}");
        // A shape larger than the buffer is a view error naming the tensor.
        let err = LayerWeights::builder()
            .host("big", &mut a, &[4, 32], DType::U8)
            .unwrap_err();
        assert!(err.to_string().contains("\"big\""), "{err}");
    }

    #[test]
    fn layouts_encode_and_compare() {
        let l = LayerLayout {
            rows: 4,
            tensors: vec![
                TensorSpec {
                    name: "w13".into(),
                    dtype: DType::Bf16,
                    row_bytes: 512,
                },
                TensorSpec {
                    name: "w2".into(),
                    dtype: DType::F8E4M3Fn,
                    row_bytes: 128,
                },
            ],
        };
        let mut w = Writer::new();
        l.encode(&mut w);
        let bytes = w.finish();
        let mut r = Reader::new(&bytes);
        assert_eq!(LayerLayout::decode(&mut r), Some(l.clone()));
        assert!(r.is_empty());
        assert_eq!(l.first_difference(&l), None);
        let mut other = l.clone();
        other.tensors[1].dtype = DType::F16;
        let (tensor, detail) = l.first_difference(&other).unwrap();
        assert_eq!(tensor.as_deref(), Some("w2"));
        assert!(
            detail.contains("float8_e4m3fn") && detail.contains("float16"),
            "{detail}"
        );
        other = l.clone();
        other.rows = 5;
        assert!(l.first_difference(&other).unwrap().1.contains("5 there"));
        assert_eq!(
            LayerLayout::decode(&mut Reader::new(&bytes[..bytes.len() - 1])),
            None
        );
    }
}
