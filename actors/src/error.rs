//! Errors of the actors crate.

use thiserror::Error;

/// Errors from the media data plane.
#[derive(Debug, Error)]
pub enum MediaError {
    #[error("invalid SDP: {0}")]
    Sdp(String),
    #[error("unknown peer {0}")]
    UnknownPeer(u64),
    #[error("peer {0} already exists")]
    DuplicatePeer(u64),
    #[error("media engine is full ({0} peers, limit.max_peers)")]
    TooManyPeers(usize),
    #[error("wrong peer role: {0}")]
    WrongRole(&'static str),
    #[error("no offer is pending for this answer")]
    NoPendingOffer,
    #[error("media engine stopped")]
    EngineGone,
    #[error("media engine is overloaded (command queue full)")]
    Overloaded,
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
}

/// Errors surfaced by the room / participant control plane.
#[derive(Debug, Error)]
pub enum RoomError {
    #[error("requested room does not exist")]
    NotFound,
    #[error("room is full ({0} participants, room.max_participants)")]
    RoomFull(u32),
    #[error("room {0} is closed")]
    RoomClosed(String),
    #[error("too many tracks for this participant (limit.max_tracks_per_participant = {0})")]
    TooManyTracks(usize),
    #[error("not allowed: {0}")]
    NotAllowed(String),
    #[error("too many rooms (limit.max_rooms = {0})")]
    TooManyRooms(usize),
    #[error("participant `{0}` not found in this room")]
    ParticipantNotFound(String),
    #[error("track `{0}` not found")]
    TrackNotFound(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    LimitExceeded(String),
    #[error(transparent)]
    Media(#[from] MediaError),
    #[error("actor mailbox error: {0}")]
    Mailbox(String),
    #[error("room directory (cluster) unavailable: {0}")]
    Directory(String),
}
