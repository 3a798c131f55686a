//! Room, participant and track actors (control) and the media data plane (packets).
//!
//! * Control flows through actix mailboxes: a [`room::Room`] owns its participants and tracks, a
//!   [`participant::Participant`] owns its signal session and its two peer connections, a
//!   [`track::Track`] owns its subscriber list. [`manager::RoomManager`] maps room names to rooms.
//! * Media never enters a mailbox: the [`media`] engine forwards packets from the socket to the
//!   subscriber transports on its own threads (media shards; each room runs on one).

pub mod codec;
pub mod config;
pub mod error;
pub mod events;
pub mod fabric;
pub mod ids;
pub mod manager;
pub mod media;
pub mod metrics;
pub mod participant;
pub mod quality;
pub mod room;
pub mod track;

pub use error::{MediaError, RoomError};

/// The LiveKit server version Arbor reports to clients (the protocol level it implements).
/// Clients gate features on it (RPC needs >= 1.8.0).
pub const LIVEKIT_COMPAT_VERSION: &str = "1.9.0";
/// The LiveKit signal protocol version Arbor implements.
pub const PROTOCOL_VERSION: i32 = 16;
