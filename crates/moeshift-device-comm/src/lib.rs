//! Ranks, groups, rendezvous store, host transport, NCCL and MoE all-to-all.
