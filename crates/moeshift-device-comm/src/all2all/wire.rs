//! Byte layout of the host managers' messages: little-endian words behind a fixed header.
//!
//! Every dispatch message (or, for gather / reduce-scatter, every rank's announcement)
//! starts with a [`DispatchHeader`] and every combine message with a [`CombineHeader`].
//! Both carry a status word, so a rank whose input is invalid still sends a well-formed
//! message that tells its peers to fail the call with it.

/// First word of a dispatch header.
pub(crate) const DISPATCH_MAGIC: u32 = u32::from_le_bytes(*b"MsDp");
/// First word of a combine header.
pub(crate) const COMBINE_MAGIC: u32 = u32::from_le_bytes(*b"MsCb");
/// Status: the sender's input is valid.
pub(crate) const STATUS_OK: u32 = 0;
/// Status: the sender rejected its own input; the payload is absent.
pub(crate) const STATUS_REJECTED: u32 = 1;

/// Appends little-endian words to a byte buffer.
pub(crate) struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    pub(crate) fn with_capacity(n: usize) -> Self {
        Self {
            buf: Vec::with_capacity(n),
        }
    }

    pub(crate) fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub(crate) fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub(crate) fn f32(&mut self, v: f32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub(crate) fn f32s(&mut self, vs: &[f32]) {
        self.words(vs.len(), vs.iter().map(|v| v.to_le_bytes()));
    }

    pub(crate) fn u32s(&mut self, vs: &[u32]) {
        self.words(vs.len(), vs.iter().map(|v| v.to_le_bytes()));
    }

    /// Appends `n` 4-byte words.
    fn words(&mut self, n: usize, words: impl Iterator<Item = [u8; 4]>) {
        self.buf.reserve(n * 4);
        for w in words {
            self.buf.extend_from_slice(&w);
        }
    }

    pub(crate) fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// Reads little-endian words; running past the end is an error naming what was read.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        match end {
            Some(end) => {
                let s = self.bytes.get(self.pos..end).unwrap_or_default();
                self.pos = end;
                Ok(s)
            }
            None => Err(format!(
                "{what}: needs {n} bytes at offset {}, the message has {}",
                self.pos,
                self.bytes.len()
            )),
        }
    }

    fn word<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    pub(crate) fn u32(&mut self, what: &str) -> Result<u32, String> {
        self.word::<4>(what).map(u32::from_le_bytes)
    }

    pub(crate) fn u64(&mut self, what: &str) -> Result<u64, String> {
        self.word::<8>(what).map(u64::from_le_bytes)
    }

    pub(crate) fn f32(&mut self, what: &str) -> Result<f32, String> {
        self.word::<4>(what).map(f32::from_le_bytes)
    }

    /// Appends `n` f32 values to `out`.
    pub(crate) fn f32s_into(
        &mut self,
        n: usize,
        out: &mut Vec<f32>,
        what: &str,
    ) -> Result<(), String> {
        self.words_into(n, out, what, f32::from_le_bytes)
    }

    /// Adds `n` f32 values element-wise into `out` (`out.len()` must be `n`).
    pub(crate) fn f32s_add(&mut self, out: &mut [f32], what: &str) -> Result<(), String> {
        let bytes = self.take(out.len().checked_mul(4).ok_or("size overflow")?, what)?;
        for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
            let mut a = [0u8; 4];
            a.copy_from_slice(c);
            *o += f32::from_le_bytes(a);
        }
        Ok(())
    }

    /// Appends `n` u32 values to `out`.
    pub(crate) fn u32s_into(
        &mut self,
        n: usize,
        out: &mut Vec<u32>,
        what: &str,
    ) -> Result<(), String> {
        self.words_into(n, out, what, u32::from_le_bytes)
    }

    /// Appends `n` 4-byte values, each decoded by `decode`, to `out`.
    fn words_into<T>(
        &mut self,
        n: usize,
        out: &mut Vec<T>,
        what: &str,
        decode: fn([u8; 4]) -> T,
    ) -> Result<(), String> {
        let bytes = self.take(n.checked_mul(4).ok_or("size overflow")?, what)?;
        out.extend(bytes.chunks_exact(4).map(|c| {
            let mut a = [0u8; 4];
            a.copy_from_slice(c);
            decode(a)
        }));
        Ok(())
    }

    /// Fails unless every byte was read.
    pub(crate) fn finish(&self) -> Result<(), String> {
        if self.pos == self.bytes.len() {
            Ok(())
        } else {
            Err(format!(
                "{} trailing bytes after offset {}",
                self.bytes.len() - self.pos,
                self.pos
            ))
        }
    }
}

/// What a rank announces at the start of a dispatch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DispatchHeader {
    pub status: u32,
    /// Token rows that follow (or, for gather, that the rank contributes).
    pub rows: u64,
    /// `(token, k)` picks that follow.
    pub picks: u64,
    pub hidden_size: u32,
    pub top_k: u32,
    pub layer: u64,
    pub fingerprint: u64,
}

impl DispatchHeader {
    pub(crate) const LEN: usize = 48;

    pub(crate) fn rejected() -> Self {
        Self {
            status: STATUS_REJECTED,
            rows: 0,
            picks: 0,
            hidden_size: 0,
            top_k: 0,
            layer: 0,
            fingerprint: 0,
        }
    }

    pub(crate) fn write(&self, w: &mut Writer) {
        w.u32(DISPATCH_MAGIC);
        w.u32(self.status);
        w.u64(self.rows);
        w.u64(self.picks);
        w.u32(self.hidden_size);
        w.u32(self.top_k);
        w.u64(self.layer);
        w.u64(self.fingerprint);
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self, String> {
        let magic = r.u32("dispatch header")?;
        if magic != DISPATCH_MAGIC {
            return Err(format!("not a dispatch header (first word {magic:#010x})"));
        }
        Ok(Self {
            status: r.u32("status")?,
            rows: r.u64("row count")?,
            picks: r.u64("pick count")?,
            hidden_size: r.u32("hidden size")?,
            top_k: r.u32("top-k")?,
            layer: r.u64("layer")?,
            fingerprint: r.u64("placement fingerprint")?,
        })
    }

    /// The first field in which `self` (a peer's) differs from `ours`, as
    /// `(field, ours, theirs)`.
    pub(crate) fn mismatch(&self, ours: &Self) -> Option<(&'static str, u64, u64)> {
        [
            ("layer", ours.layer, self.layer),
            (
                "hidden size",
                u64::from(ours.hidden_size),
                u64::from(self.hidden_size),
            ),
            ("top-k", u64::from(ours.top_k), u64::from(self.top_k)),
            ("placement fingerprint", ours.fingerprint, self.fingerprint),
        ]
        .into_iter()
        .find(|(_, a, b)| a != b)
    }
}

/// What a rank sends first in every combine message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CombineHeader {
    pub status: u32,
    /// Output rows that follow.
    pub rows: u64,
    /// Rows the sender expects back from the receiver (those it dispatched there), so
    /// both ranks of a pair check the same two counts.
    pub expects: u64,
    pub hidden_size: u32,
    pub layer: u64,
}

impl CombineHeader {
    pub(crate) const LEN: usize = 36;

    pub(crate) fn write(&self, w: &mut Writer) {
        w.u32(COMBINE_MAGIC);
        w.u32(self.status);
        w.u64(self.rows);
        w.u64(self.expects);
        w.u32(self.hidden_size);
        w.u64(self.layer);
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self, String> {
        let magic = r.u32("combine header")?;
        if magic != COMBINE_MAGIC {
            return Err(format!("not a combine header (first word {magic:#010x})"));
        }
        Ok(Self {
            status: r.u32("status")?,
            rows: r.u64("row count")?,
            expects: r.u64("expected row count")?,
            hidden_size: r.u32("hidden size")?,
            layer: r.u64("layer")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip() {
        let h = DispatchHeader {
            status: STATUS_OK,
            rows: 3,
            picks: 6,
            hidden_size: 64,
            top_k: 2,
            layer: 5,
            fingerprint: 0xdead_beef_0123_4567,
        };
        let mut w = Writer::with_capacity(DispatchHeader::LEN);
        h.write(&mut w);
        let bytes = w.finish();
        assert_eq!(bytes.len(), DispatchHeader::LEN);
        let mut r = Reader::new(&bytes);
        assert_eq!(DispatchHeader::read(&mut r), Ok(h));
        assert_eq!(r.finish(), Ok(()));

        let c = CombineHeader {
            status: STATUS_REJECTED,
            rows: 0,
            expects: 5,
            hidden_size: 8,
            layer: 1,
        };
        let mut w = Writer::with_capacity(CombineHeader::LEN);
        c.write(&mut w);
        let bytes = w.finish();
        assert_eq!(bytes.len(), CombineHeader::LEN);
        assert_eq!(CombineHeader::read(&mut Reader::new(&bytes)), Ok(c));
        // A combine message is not a dispatch header.
        assert!(DispatchHeader::read(&mut Reader::new(&bytes)).is_err());
    }

    #[test]
    fn truncated_and_trailing_bytes_are_errors() {
        let mut w = Writer::with_capacity(12);
        w.f32s(&[1.5, -2.0]);
        w.u32(7);
        let bytes = w.finish();
        let mut r = Reader::new(&bytes);
        let mut out = Vec::new();
        r.f32s_into(2, &mut out, "rows").expect("two floats");
        assert_eq!(out, [1.5, -2.0]);
        assert!(r.finish().is_err(), "one word left");
        let err = r.u64("picks").expect_err("only 4 bytes left");
        assert!(
            err.contains("picks") && err.contains("needs 8 bytes"),
            "{err}"
        );
        let mut sums = [1.0f32, 1.0];
        Reader::new(&bytes)
            .f32s_add(&mut sums, "partials")
            .expect("add");
        assert_eq!(sums, [2.5, -1.0]);
    }

    #[test]
    fn mismatch_names_the_first_differing_field() {
        let a = DispatchHeader {
            status: STATUS_OK,
            rows: 1,
            picks: 1,
            hidden_size: 8,
            top_k: 1,
            layer: 0,
            fingerprint: 1,
        };
        let mut b = a;
        b.rows = 9; // row counts may differ
        assert_eq!(b.mismatch(&a), None);
        b.fingerprint = 2;
        assert_eq!(b.mismatch(&a), Some(("placement fingerprint", 1, 2)));
        b.hidden_size = 16;
        assert_eq!(b.mismatch(&a), Some(("hidden size", 8, 16)));
    }
}
