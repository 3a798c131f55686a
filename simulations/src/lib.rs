//! Seeded, deterministic discrete-event simulators that drive the real `arbor-topology` code.

pub mod capacity;
