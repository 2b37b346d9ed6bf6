//! The store's wire format: length-prefixed requests and responses.
//!
//! A message is a little-endian `u32` body length followed by the body: a one-byte tag, then
//! the fields. Strings and byte strings are a `u32` length and the bytes; integers are
//! little-endian. Every length is checked against a limit before anything is allocated.

use std::io::{self, Read, Write};

/// Longest key accepted.
pub const MAX_KEY_LEN: usize = 64 * 1024;
/// Largest value accepted.
pub const MAX_VALUE_LEN: usize = 256 * 1024 * 1024;
/// Most keys in one wait request.
pub const MAX_WAIT_KEYS: usize = 1 << 20;
/// Largest message body (a value plus its key and tags).
const MAX_BODY_LEN: usize = MAX_VALUE_LEN + MAX_KEY_LEN + 64;

/// A request from a client to the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Request {
    Hello { rank: u32, world_size: u32 },
    Set { key: String, value: Vec<u8> },
    Get { key: String, timeout_ms: u64 },
    TryGet { key: String },
    Add { key: String, delta: i64 },
    Wait { keys: Vec<String>, timeout_ms: u64 },
    Delete { key: String },
}

/// The store's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Response {
    Ok,
    Value(Vec<u8>),
    Int(i64),
    NotFound,
    Missing(Vec<String>),
    Error(String),
    Bool(bool),
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

struct Encoder(Vec<u8>);

impl Encoder {
    fn new(tag: u8) -> Self {
        // Room for the length prefix, patched in `finish`.
        Self(vec![0, 0, 0, 0, tag])
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) -> io::Result<()> {
        let len = u32::try_from(b.len()).map_err(|_| invalid("field longer than 4 GiB"))?;
        self.u32(len);
        self.0.extend_from_slice(b);
        Ok(())
    }
    fn finish(mut self) -> io::Result<Vec<u8>> {
        let body = self.0.len() - 4;
        if body > MAX_BODY_LEN {
            return Err(invalid(format!(
                "store message of {body} bytes exceeds the limit of {MAX_BODY_LEN}"
            )));
        }
        let len = u32::try_from(body).map_err(|_| invalid("message longer than 4 GiB"))?;
        self.0[..4].copy_from_slice(&len.to_le_bytes());
        Ok(self.0)
    }
}

struct Decoder<'a> {
    buf: &'a [u8],
}

impl<'a> Decoder<'a> {
    fn take(&mut self, n: usize) -> io::Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(invalid(format!(
                "truncated store message: wanted {n} more bytes, {} left",
                self.buf.len()
            )));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u8(&mut self) -> io::Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn array<const N: usize>(&mut self) -> io::Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
    fn u32(&mut self) -> io::Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> io::Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn i64(&mut self) -> io::Result<i64> {
        Ok(i64::from_le_bytes(self.array()?))
    }
    fn bytes(&mut self, limit: usize, what: &str) -> io::Result<Vec<u8>> {
        let len = self.u32()? as usize;
        if len > limit {
            return Err(invalid(format!(
                "{what} of {len} bytes exceeds the limit of {limit}"
            )));
        }
        Ok(self.take(len)?.to_vec())
    }
    fn string(&mut self, limit: usize, what: &str) -> io::Result<String> {
        String::from_utf8(self.bytes(limit, what)?)
            .map_err(|_| invalid(format!("{what} is not UTF-8")))
    }
    fn key(&mut self) -> io::Result<String> {
        self.string(MAX_KEY_LEN, "key")
    }
    fn keys(&mut self) -> io::Result<Vec<String>> {
        let n = self.u32()? as usize;
        if n > MAX_WAIT_KEYS {
            return Err(invalid(format!(
                "{n} keys exceed the limit of {MAX_WAIT_KEYS}"
            )));
        }
        // Each key needs at least its 4-byte length, which bounds a lying count.
        if n.saturating_mul(4) > self.buf.len() {
            return Err(invalid(format!("truncated list of {n} keys")));
        }
        (0..n).map(|_| self.key()).collect()
    }
    fn end(&self) -> io::Result<()> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(invalid(format!(
                "{} unexpected trailing bytes in store message",
                self.buf.len()
            )))
        }
    }
}

fn check_key(key: &str) -> io::Result<()> {
    if key.len() > MAX_KEY_LEN {
        return Err(invalid(format!(
            "key of {} bytes exceeds the limit of {MAX_KEY_LEN}",
            key.len()
        )));
    }
    Ok(())
}

impl Request {
    /// Encodes the request, length prefix included.
    pub fn encode(&self) -> io::Result<Vec<u8>> {
        let e = match self {
            Request::Hello { rank, world_size } => {
                let mut e = Encoder::new(1);
                e.u32(*rank);
                e.u32(*world_size);
                e
            }
            Request::Set { key, value } => {
                check_key(key)?;
                if value.len() > MAX_VALUE_LEN {
                    return Err(invalid(format!(
                        "value of {} bytes exceeds the limit of {MAX_VALUE_LEN}",
                        value.len()
                    )));
                }
                let mut e = Encoder::new(2);
                e.bytes(key.as_bytes())?;
                e.bytes(value)?;
                e
            }
            Request::Get { key, timeout_ms } => {
                check_key(key)?;
                let mut e = Encoder::new(3);
                e.bytes(key.as_bytes())?;
                e.u64(*timeout_ms);
                e
            }
            Request::TryGet { key } => {
                check_key(key)?;
                let mut e = Encoder::new(4);
                e.bytes(key.as_bytes())?;
                e
            }
            Request::Add { key, delta } => {
                check_key(key)?;
                let mut e = Encoder::new(5);
                e.bytes(key.as_bytes())?;
                e.i64(*delta);
                e
            }
            Request::Wait { keys, timeout_ms } => {
                if keys.len() > MAX_WAIT_KEYS {
                    return Err(invalid(format!(
                        "{} keys exceed the limit of {MAX_WAIT_KEYS}",
                        keys.len()
                    )));
                }
                let mut e = Encoder::new(6);
                e.u32(keys.len() as u32);
                for k in keys {
                    check_key(k)?;
                    e.bytes(k.as_bytes())?;
                }
                e.u64(*timeout_ms);
                e
            }
            Request::Delete { key } => {
                check_key(key)?;
                let mut e = Encoder::new(7);
                e.bytes(key.as_bytes())?;
                e
            }
        };
        e.finish()
    }

    /// Decodes a request body (without its length prefix).
    pub fn decode(body: &[u8]) -> io::Result<Self> {
        let mut d = Decoder { buf: body };
        let req = match d.u8()? {
            1 => Request::Hello {
                rank: d.u32()?,
                world_size: d.u32()?,
            },
            2 => Request::Set {
                key: d.key()?,
                value: d.bytes(MAX_VALUE_LEN, "value")?,
            },
            3 => Request::Get {
                key: d.key()?,
                timeout_ms: d.u64()?,
            },
            4 => Request::TryGet { key: d.key()? },
            5 => Request::Add {
                key: d.key()?,
                delta: d.i64()?,
            },
            6 => Request::Wait {
                keys: d.keys()?,
                timeout_ms: d.u64()?,
            },
            7 => Request::Delete { key: d.key()? },
            tag => return Err(invalid(format!("unknown store request tag {tag}"))),
        };
        d.end()?;
        Ok(req)
    }
}

impl Response {
    /// Encodes the response, length prefix included.
    pub fn encode(&self) -> io::Result<Vec<u8>> {
        let e = match self {
            Response::Ok => Encoder::new(1),
            Response::Value(v) => {
                let mut e = Encoder::new(2);
                e.bytes(v)?;
                e
            }
            Response::Int(i) => {
                let mut e = Encoder::new(3);
                e.i64(*i);
                e
            }
            Response::NotFound => Encoder::new(4),
            Response::Missing(keys) => {
                let mut e = Encoder::new(5);
                e.u32(u32::try_from(keys.len()).map_err(|_| invalid("too many keys"))?);
                for k in keys {
                    e.bytes(k.as_bytes())?;
                }
                e
            }
            Response::Error(msg) => {
                let mut e = Encoder::new(6);
                e.bytes(msg.as_bytes())?;
                e
            }
            Response::Bool(b) => {
                let mut e = Encoder::new(7);
                e.0.push(u8::from(*b));
                e
            }
        };
        e.finish()
    }

    /// Decodes a response body (without its length prefix).
    pub fn decode(body: &[u8]) -> io::Result<Self> {
        let mut d = Decoder { buf: body };
        let resp = match d.u8()? {
            1 => Response::Ok,
            2 => Response::Value(d.bytes(MAX_VALUE_LEN, "value")?),
            3 => Response::Int(d.i64()?),
            4 => Response::NotFound,
            5 => Response::Missing(d.keys()?),
            6 => Response::Error(d.string(MAX_BODY_LEN, "error message")?),
            7 => match d.u8()? {
                0 => Response::Bool(false),
                1 => Response::Bool(true),
                b => return Err(invalid(format!("bad boolean byte {b}"))),
            },
            tag => return Err(invalid(format!("unknown store response tag {tag}"))),
        };
        d.end()?;
        Ok(resp)
    }
}

/// Reads one message body. `Ok(None)` on a clean end of stream before the first byte.
pub(crate) fn read_body(r: &mut impl Read) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < len.len() {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed inside a message",
                ))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let len = u32::from_le_bytes(len) as usize;
    if len == 0 || len > MAX_BODY_LEN {
        return Err(invalid(format!(
            "store message length {len} is outside 1..={MAX_BODY_LEN}"
        )));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(Some(body))
}

/// Writes an encoded message.
pub(crate) fn write_msg(w: &mut impl Write, encoded: &[u8]) -> io::Result<()> {
    w.write_all(encoded)?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip_req(req: Request) -> Request {
        let bytes = req.encode().expect("encode");
        let mut r = &bytes[..];
        let body = read_body(&mut r).expect("read").expect("one message");
        assert!(r.is_empty());
        Request::decode(&body).expect("decode")
    }

    fn roundtrip_resp(resp: Response) -> Response {
        let bytes = resp.encode().expect("encode");
        let mut r = &bytes[..];
        let body = read_body(&mut r).expect("read").expect("one message");
        Response::decode(&body).expect("decode")
    }

    #[test]
    fn length_prefix_is_little_endian_body_length() {
        let bytes = Request::TryGet { key: "ab".into() }
            .encode()
            .expect("encode");
        // tag (1) + key length (4) + key (2) = 7 bytes of body.
        assert_eq!(&bytes[..4], &7u32.to_le_bytes());
        assert_eq!(bytes[4], 4);
        assert_eq!(&bytes[5..9], &2u32.to_le_bytes());
        assert_eq!(&bytes[9..], b"ab");
    }

    #[test]
    fn every_response_roundtrips() {
        for resp in [
            Response::Ok,
            Response::Value(vec![1, 2, 3]),
            Response::Int(-42),
            Response::NotFound,
            Response::Missing(vec!["a".into(), "b/c".into()]),
            Response::Error("nope".into()),
            Response::Bool(true),
            Response::Bool(false),
        ] {
            assert_eq!(roundtrip_resp(resp.clone()), resp);
        }
    }

    #[test]
    fn end_of_stream_before_a_message_is_clean_but_inside_is_an_error() {
        let mut empty: &[u8] = &[];
        assert!(read_body(&mut empty).expect("clean").is_none());
        let mut partial: &[u8] = &[5, 0];
        assert!(read_body(&mut partial).is_err());
        let mut short_body: &[u8] = &[5, 0, 0, 0, 1];
        assert!(read_body(&mut short_body).is_err());
    }

    #[test]
    fn oversized_lengths_are_rejected_before_allocating() {
        let mut huge: &[u8] = &[0xff, 0xff, 0xff, 0xff];
        let err = read_body(&mut huge).expect_err("4 GiB body");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        // A key length larger than the limit inside a well-formed body.
        let mut body = vec![4u8];
        body.extend_from_slice(&(MAX_KEY_LEN as u32 + 1).to_le_bytes());
        assert!(Request::decode(&body).is_err());
        // A wait with a key count its body cannot hold.
        let mut body = vec![6u8];
        body.extend_from_slice(&1000u32.to_le_bytes());
        assert!(Request::decode(&body).is_err());
    }

    #[test]
    fn unknown_tags_and_trailing_bytes_are_errors() {
        assert!(Request::decode(&[99]).is_err());
        assert!(Response::decode(&[99]).is_err());
        assert!(Response::decode(&[1, 0]).is_err());
        assert!(Response::decode(&[7, 2]).is_err());
    }

    proptest! {
        #[test]
        fn requests_roundtrip(
            key in "[a-z/0-9]{0,40}",
            value in proptest::collection::vec(any::<u8>(), 0..300),
            n in any::<u32>(),
            t in any::<u64>(),
            delta in any::<i64>(),
            keys in proptest::collection::vec("[a-z]{0,8}", 0..6),
        ) {
            for req in [
                Request::Hello { rank: n, world_size: n / 2 },
                Request::Set { key: key.clone(), value: value.clone() },
                Request::Get { key: key.clone(), timeout_ms: t },
                Request::TryGet { key: key.clone() },
                Request::Add { key: key.clone(), delta },
                Request::Wait { keys: keys.clone(), timeout_ms: t },
                Request::Delete { key: key.clone() },
            ] {
                prop_assert_eq!(roundtrip_req(req.clone()), req);
            }
        }

        #[test]
        fn decoding_garbage_never_panics(body in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Request::decode(&body);
            let _ = Response::decode(&body);
        }
    }
}
