//! Property tests for views: random shapes, then random `narrow` / `select` / `transpose`
//! chains, checked against a brute-force oracle that enumerates every element's offset from
//! shape, strides and offset alone.

use moeshift_tensor::{DType, Device, Storage, TensorView};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Narrow {
        dim: usize,
        start: usize,
        len: usize,
    },
    Select {
        dim: usize,
        index: usize,
    },
    Transpose {
        dim0: usize,
        dim1: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    // Raw numbers; they are reduced modulo the current shape when applied, so most ops are
    // valid and the chain keeps going.
    prop_oneof![
        (0..4usize, 0..6usize, 0..6usize).prop_map(|(dim, start, len)| Op::Narrow {
            dim,
            start,
            len
        }),
        (0..4usize, 0..6usize).prop_map(|(dim, index)| Op::Select { dim, index }),
        (0..4usize, 0..4usize).prop_map(|(dim0, dim1)| Op::Transpose { dim0, dim1 }),
    ]
}

fn dtype() -> impl Strategy<Value = DType> {
    proptest::sample::select(DType::ALL.to_vec())
}

/// Applies `op` adjusted to the view's shape; `None` when it does not apply (rank 0).
fn apply(view: &TensorView, op: &Op) -> Option<TensorView> {
    let rank = view.rank();
    if rank == 0 {
        return None;
    }
    let out = match *op {
        Op::Narrow { dim, start, len } => {
            let dim = dim % rank;
            let size = view.shape()[dim];
            let start = start % (size + 1);
            let len = len % (size - start + 1);
            view.narrow(dim, start, len)
        }
        Op::Select { dim, index } => {
            let dim = dim % rank;
            let size = view.shape()[dim];
            if size == 0 {
                return None;
            }
            view.select(dim, index % size)
        }
        Op::Transpose { dim0, dim1 } => view.transpose(dim0 % rank, dim1 % rank),
    };
    Some(out.expect("an in-range operation on a valid view must succeed"))
}

/// Element offsets (in storage elements) of every element, in row-major index order.
fn element_offsets(view: &TensorView) -> Vec<usize> {
    let shape = view.shape();
    let strides = view.strides();
    if shape.contains(&0) {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut index = vec![0usize; shape.len()];
    loop {
        let off: usize =
            view.offset() + index.iter().zip(strides).map(|(i, s)| i * s).sum::<usize>();
        out.push(off);
        // Odometer increment, last dim fastest.
        let mut d = shape.len();
        loop {
            if d == 0 {
                return out;
            }
            d -= 1;
            index[d] += 1;
            if index[d] < shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
}

/// The oracle for expert rows: for each row (dim 0 index), the element offsets in row-major
/// order must be consecutive, and each row must start at or after the previous row's end.
/// Returns the start offset of each row, or `None` when the layout is not row-addressable.
fn oracle_rows(view: &TensorView) -> Option<Vec<usize>> {
    if view.rank() == 0 {
        return None;
    }
    let rows = view.shape()[0];
    let all = element_offsets(view);
    let row_numel: usize = view.shape()[1..].iter().product();
    let mut starts = Vec::with_capacity(rows);
    for r in 0..rows {
        // Row start, from the geometry (also meaningful for empty rows).
        let start = view.offset() + r * view.strides()[0];
        if row_numel > 0 {
            let row = &all[r * row_numel..(r + 1) * row_numel];
            if row.iter().enumerate().any(|(k, &off)| off != start + k) {
                return None;
            }
        }
        if let Some(&prev) = starts.last() {
            if row_numel > 0 && start < prev + row_numel {
                return None;
            }
        }
        starts.push(start);
    }
    Some(starts)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn views_agree_with_the_brute_force_oracle(
        shape in prop::collection::vec(0..5usize, 0..=4),
        slack in 0..4usize,
        dtype in dtype(),
        ops in prop::collection::vec(op(), 0..6),
    ) {
        let numel: usize = shape.iter().product();
        let addr = 0x7f00_0000_0000u64;
        let storage = Storage::new(addr, numel + slack, dtype, Device::Cuda(1));
        let mut view = TensorView::contiguous(storage, &shape).unwrap();
        for op in &ops {
            if let Some(next) = apply(&view, op) {
                view = next;
            }
        }
        let elem = dtype.size_bytes();
        let offsets = element_offsets(&view);

        // numel / nbytes consistent with the enumeration.
        prop_assert_eq!(view.numel(), offsets.len());
        prop_assert_eq!(view.nbytes(), offsets.len() * elem);
        prop_assert_eq!(view.numel(), view.shape().iter().product::<usize>());

        // Every element is inside the storage.
        for &off in &offsets {
            prop_assert!(off < view.storage_len());
        }

        // Contiguous exactly when the elements are consecutive from the offset.
        let dense = offsets.iter().enumerate().all(|(k, &off)| off == view.offset() + k);
        prop_assert_eq!(view.is_contiguous(), dense);

        // contiguous ⇒ weakly contiguous; and the weak rule itself.
        if view.is_contiguous() {
            prop_assert!(view.is_weak_contiguous());
        }
        let covers_rest = view
            .storage_len()
            .checked_sub(view.offset())
            .is_some_and(|rest| rest == view.numel());
        prop_assert_eq!(view.is_weak_contiguous(), dense || covers_rest);

        // Expert rows accepted exactly when the oracle says rows are dense and outermost.
        let oracle = oracle_rows(&view);
        match (view.expert_rows(), oracle) {
            (Ok(rows), Some(starts)) => {
                prop_assert_eq!(rows.num_rows(), view.shape()[0]);
                let row_numel: usize = view.shape()[1..].iter().product();
                prop_assert_eq!(rows.row_bytes(), row_numel * elem);
                prop_assert!(rows.row_stride_bytes() >= rows.row_bytes());
                let storage_end = addr + (view.storage_len() * elem) as u64;
                for (r, start) in starts.iter().enumerate() {
                    let range = rows.row_range(r).unwrap();
                    // Empty rows hold no bytes; like PyTorch's data pointer of an empty
                    // tensor, their address is not bounds-checked.
                    if row_numel > 0 {
                        prop_assert_eq!(range.start, addr + (start * elem) as u64);
                        prop_assert!(range.start >= addr);
                        prop_assert!(range.end <= storage_end);
                    }
                }
                prop_assert!(rows.row_addr(view.shape()[0]).is_err());
            }
            (Err(_), None) => {}
            (got, want) => prop_assert!(
                false,
                "expert_rows {:?} but oracle {:?} for shape {:?} strides {:?} offset {}",
                got, want, view.shape(), view.strides(), view.offset()
            ),
        }
    }

    #[test]
    fn explicit_strides_are_bounds_checked(
        shape in prop::collection::vec(1..5usize, 1..=3),
        strides in prop::collection::vec(0..12usize, 3),
        offset in 0..8usize,
        len in 0..64usize,
    ) {
        let strides = strides[..shape.len()].to_vec();
        let storage = Storage::new(0x1000, len, DType::F16, Device::Host);
        let furthest = offset
            + shape.iter().zip(&strides).map(|(n, s)| (n - 1) * s).sum::<usize>();
        let made = TensorView::new(storage, offset, shape.clone(), strides.clone());
        prop_assert_eq!(made.is_ok(), furthest < len);
        if let Ok(view) = made {
            prop_assert!(element_offsets(&view).iter().all(|&o| o < len));
        }
    }
}
