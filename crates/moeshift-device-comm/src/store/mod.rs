//! The rendezvous store: a small key-value server hosted by rank 0, and the client every
//! rank (rank 0 included) uses to reach it.
//!
//! Ranks publish and look up what they need to meet each other: host-transport addresses,
//! the NCCL unique id, NIXL agent metadata. Every call takes a [`Deadline`](moeshift_sync::Deadline).

mod client;
mod server;
pub mod wire;

pub use client::StoreClient;
pub(crate) use client::INTERNAL_PREFIX;
pub use server::StoreServer;
