//! Cluster topology: node registry, regions, relay-tree planning, relay links, Raft membership.

pub mod nodes;
pub mod planner;
