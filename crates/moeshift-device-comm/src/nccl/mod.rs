//! NCCL communicator (feature `cuda`).
