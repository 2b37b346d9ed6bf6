//! The outcome exchange that closes a step on every rank: one `all_gather` in which each
//! rank says whether its part succeeded, so all ranks reach the same verdict (and none
//! leaves while a peer may still READ from it).

use moeshift_device_comm::HostGroup;
use moeshift_sync::Deadline;

use crate::error::EplbCommError;
use crate::wire::{Reader, Writer};

/// One `all_gather` of every rank's outcome of a step (`None` = fine, or the reason it
/// failed). Returns the peers that failed, with their reasons, in rank order.
pub(super) fn exchange_status(
    group: &HostGroup,
    layer: Option<usize>,
    what: &str,
    failure: Option<&str>,
    deadline: Deadline,
) -> Result<Vec<(usize, String)>, EplbCommError> {
    let me = group.rank();
    let mut w = Writer::with_capacity(32);
    match failure {
        None => w.u8(0).bytes(&[]),
        Some(reason) => w.u8(1).bytes(reason.as_bytes()),
    };
    let gathered = group
        .all_gather(w.as_slice(), deadline)
        .map_err(|e| EplbCommError::from_comm(me, layer, format!("{what} (all_gather)"), e))?;
    let mut failed = Vec::new();
    for (peer, bytes) in gathered.iter().enumerate() {
        if peer == me {
            continue;
        }
        let mut r = Reader::new(bytes);
        match (r.u8(), r.bytes()) {
            (Some(0), Some(_)) if r.is_empty() => {}
            (Some(1), Some(reason)) if r.is_empty() => {
                failed.push((peer, String::from_utf8_lossy(reason).into_owned()));
            }
            _ => failed.push((
                peer,
                format!(
                    "its {what} message ({} bytes) cannot be decoded",
                    bytes.len()
                ),
            )),
        }
    }
    Ok(failed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use moeshift_device_comm::{StoreClient, World};
    use std::time::Duration;

    #[test]
    fn a_lone_rank_has_no_failed_peers() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let world = World::single_node(0, 1, "127.0.0.1", port).expect("world");
        let deadline = Deadline::after(Duration::from_secs(10));
        let store = StoreClient::connect(&world, deadline).expect("store");
        let group = HostGroup::world(&store, deadline).expect("group");
        assert_eq!(
            exchange_status(&group, None, "a test", None, deadline).unwrap(),
            vec![]
        );
        // Its own failure is not reported back as a peer's.
        assert_eq!(
            exchange_status(&group, Some(3), "a test", Some("boom"), deadline).unwrap(),
            vec![]
        );
    }
}
