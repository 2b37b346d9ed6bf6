//! Expert placement math: maps, policies and transfer plans.
