//! Splitting one peer's READs of a layer into several requests of nearly equal bytes, so
//! they run on several UCX workers (hence several CUDA streams) at once.
//!
//! The pieces of a peer are laid end to end as one stream of bytes, in the order the rows
//! were planned, and the stream is cut into `parts` equal spans. A cut that falls inside a
//! descriptor moves to the nearest multiple of [`GRAIN`] bytes from the descriptor's start,
//! or to its end (so the pieces keep the rows' alignment and are never tiny): a descriptor
//! shorter than a grain stays whole, on the side of the cut where most of it lies. Every byte
//! of every descriptor ends up in exactly one request, at the same local and remote
//! offsets: descriptors are plain byte ranges, so a row read in pieces lands exactly as a
//! row read whole.

use super::agent::ReadDesc;

/// Where a cut inside a descriptor may fall: multiples of this many bytes from its start.
pub(crate) const GRAIN: usize = 4096;

/// A byte range to READ and the expert whose row it belongs to (for error messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Piece {
    /// The expert.
    pub(crate) expert: usize,
    /// The bytes.
    pub(crate) desc: ReadDesc,
}

impl Piece {
    /// Bytes `from .. to` of this piece.
    fn slice(&self, from: usize, to: usize) -> Piece {
        Piece {
            expert: self.expert,
            desc: ReadDesc {
                local: self.desc.local.saturating_add(from as u64),
                remote: self.desc.remote.saturating_add(from as u64),
                len: to.saturating_sub(from),
            },
        }
    }
}

/// Splits `pieces` into at most `parts` non-empty requests of nearly equal bytes, keeping
/// their order (see the module documentation); cuts inside a piece fall on multiples of
/// `grain` bytes from its start. Empty pieces are dropped; no pieces give no requests.
pub(crate) fn split_even(pieces: &[Piece], parts: usize, grain: usize) -> Vec<Vec<Piece>> {
    let parts = parts.max(1);
    let grain = grain.max(1);
    let total: u128 = pieces.iter().map(|p| p.desc.len as u128).sum();
    // Where part `k` ends in the stream of bytes (`k` in 1..parts).
    let boundary = |k: usize| total * k as u128 / parts as u128;
    let mut out: Vec<Vec<Piece>> = vec![Vec::new(); parts];
    let mut part = 0usize;
    let mut at = 0u128; // stream offset of the current piece's first byte
    for p in pieces {
        let len = p.desc.len;
        let mut from = 0usize; // bytes of `p` already given to a part
        while part + 1 < parts {
            let end = boundary(part + 1);
            if end >= at + len as u128 {
                break; // the current part takes the rest of `p`
            }
            let raw = usize::try_from(end.saturating_sub(at)).unwrap_or(len);
            let cut = cut_point(raw, len, grain).clamp(from, len);
            if cut > from {
                if let Some(slot) = out.get_mut(part) {
                    slot.push(p.slice(from, cut));
                }
                from = cut;
            }
            part += 1;
        }
        if from < len {
            if let Some(slot) = out.get_mut(part) {
                slot.push(p.slice(from, len));
            }
        }
        at += len as u128;
    }
    out.retain(|r| !r.is_empty());
    out
}

/// Where to cut a piece of `len` bytes whose share ends `raw` bytes into it: the multiple
/// of `grain` or the end of the piece nearest to `raw` (ties go to the later point).
fn cut_point(raw: usize, len: usize, grain: usize) -> usize {
    let down = raw / grain * grain;
    let up = down.saturating_add(grain).min(len).max(down);
    if raw.saturating_sub(down) >= up.saturating_sub(raw) {
        up
    } else {
        down
    }
}

/// The experts of `request`, sorted, each once.
pub(crate) fn experts_of(request: &[Piece]) -> Vec<usize> {
    let mut experts: Vec<usize> = request.iter().map(|p| p.expert).collect();
    experts.sort_unstable();
    experts.dedup();
    experts
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pieces of the given lengths, expert = index, local ranges back to back from 0x1000
    /// and remote ranges from 0x9000 with a 100-byte gap between them.
    fn pieces(lens: &[usize]) -> Vec<Piece> {
        let (mut local, mut remote) = (0x1000u64, 0x9000u64);
        lens.iter()
            .enumerate()
            .map(|(expert, &len)| {
                let p = Piece {
                    expert,
                    desc: ReadDesc { local, remote, len },
                };
                local += len as u64;
                remote += len as u64 + 100;
                p
            })
            .collect()
    }

    /// Every byte of every input piece, as (local, remote) address pairs, in order.
    fn bytes(pieces: &[Piece]) -> Vec<(u64, u64)> {
        pieces
            .iter()
            .flat_map(|p| {
                (0..p.desc.len as u64).map(move |i| (p.desc.local + i, p.desc.remote + i))
            })
            .collect()
    }

    fn sizes(requests: &[Vec<Piece>]) -> Vec<usize> {
        requests
            .iter()
            .map(|r| r.iter().map(|p| p.desc.len).sum())
            .collect()
    }

    #[test]
    fn one_part_keeps_the_pieces_as_they_are() {
        let input = pieces(&[10, 0, 30]);
        let out = split_even(&input, 1, GRAIN);
        assert_eq!(out, vec![vec![input[0], input[2]]]);
        assert_eq!(split_even(&input, 0, GRAIN), out, "0 parts act as 1");
        assert!(split_even(&[], 4, GRAIN).is_empty());
        assert!(split_even(&pieces(&[0, 0]), 4, GRAIN).is_empty());
    }

    #[test]
    fn large_rows_are_cut_into_equal_spans_on_grain_multiples() {
        // Two rows of 10 grains each, four parts: 5 grains per part, the cuts land in the
        // middle of each row.
        let g = GRAIN;
        let input = pieces(&[10 * g, 10 * g]);
        let out = split_even(&input, 4, g);
        assert_eq!(sizes(&out), vec![5 * g; 4]);
        assert_eq!(out[0], vec![input[0].slice(0, 5 * g)]);
        assert_eq!(out[1], vec![input[0].slice(5 * g, 10 * g)]);
        assert_eq!(out[3], vec![input[1].slice(5 * g, 10 * g)]);
        assert_eq!(out[1][0].desc.local, 0x1000 + 5 * g as u64);
        assert_eq!(out[1][0].desc.remote, 0x9000 + 5 * g as u64);
        assert_eq!(experts_of(&out[1]), vec![0]);

        // DeepSeek-V3 sizes: 8 experts of w13 (56 MiB) and w2 (28 MiB), four streams: two
        // whole experts per request.
        let (w13, w2) = (4096 * 7168 * 2, 7168 * 2048 * 2);
        let input = pieces(&[w13, w2].repeat(8));
        let out = split_even(&input, 4, g);
        assert_eq!(sizes(&out), vec![2 * (w13 + w2); 4]);
        for r in &out {
            assert_eq!(r.len(), 4, "whole rows only");
        }
    }

    #[test]
    fn small_rows_stay_whole_and_go_to_the_nearer_side() {
        // Total 100, two parts: the boundary at 50 falls 10 bytes into the 60-byte piece,
        // which stays whole and goes to the second part (its larger share lies there).
        let input = pieces(&[40, 60]);
        let out = split_even(&input, 2, GRAIN);
        assert_eq!(out, vec![vec![input[0]], vec![input[1]]]);
        // The boundary 10 bytes before the end of a 60-byte piece: it goes to the first.
        let input = pieces(&[60, 40]);
        assert_eq!(
            split_even(&input, 2, GRAIN),
            vec![vec![input[0]], vec![input[1]]]
        );
        // Fewer pieces than parts: at most one request per piece.
        let input = pieces(&[7, 7]);
        assert_eq!(split_even(&input, 4, GRAIN).len(), 2);
        assert_eq!(experts_of(&input), vec![0, 1]);
    }

    #[test]
    fn every_byte_lands_once_and_the_spans_are_balanced() {
        // A simple generator: the same cases every run.
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut next = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let grain = 64;
        for case in 0..300 {
            let count = 1 + next(12) as usize;
            let lens: Vec<usize> = (0..count)
                .map(|_| match next(4) {
                    0 => next(5) as usize,                 // empty or tiny
                    1 => next(grain as u64) as usize,      // below a grain
                    _ => next(40 * grain as u64) as usize, // several grains
                })
                .collect();
            let parts = 1 + next(6) as usize;
            let input = pieces(&lens);
            let out = split_even(&input, parts, grain);
            let what = format!("case {case}: {lens:?} into {parts}");
            assert!(out.len() <= parts, "{what}");
            assert!(out.iter().all(|r| !r.is_empty()), "{what}");
            assert!(out.iter().flatten().all(|p| p.desc.len > 0), "{what}");
            // Same bytes, same order, same local/remote pairing.
            let flat: Vec<Piece> = out.iter().flatten().copied().collect();
            assert_eq!(bytes(&flat), bytes(&input), "{what}");
            // Cuts inside a piece fall on grain multiples from its start.
            for p in &flat {
                let whole = input.iter().find(|q| q.expert == p.expert).unwrap();
                let offset = (p.desc.local - whole.desc.local) as usize;
                assert!(offset % grain == 0, "{what}: piece at offset {offset}");
                let end = offset + p.desc.len;
                assert!(end == whole.desc.len || end % grain == 0, "{what}");
            }
            // Each request is within a grain or one small piece per cut of its share.
            let total: usize = lens.iter().sum();
            let small = lens
                .iter()
                .copied()
                .filter(|&l| l < grain)
                .max()
                .unwrap_or(0);
            let slack = 2 * grain.max(small);
            if out.len() == parts {
                for s in sizes(&out) {
                    assert!(
                        s.abs_diff(total / parts) <= slack,
                        "{what}: {s} vs {}",
                        total / parts
                    );
                }
            }
        }
    }
}
