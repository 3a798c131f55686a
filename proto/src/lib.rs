//! Wire types. No I/O.
//!
//! * [`livekit`] — the LiveKit protocol, re-exported from the `livekit-protocol` crate (never hand-copied).
//! * Arbor's own relay and membership messages are prost types defined in this crate's modules.

pub use livekit_protocol as livekit;

pub mod membership;
pub mod relay;
