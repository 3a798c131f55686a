//! Control-plane settings handed to rooms and participants (filled from the server config).

use std::time::Duration;

/// Room defaults and per-room / per-participant limits.
#[derive(Debug, Clone)]
pub struct RoomSettings {
    /// Close a room that was created but never joined after this long (`room.empty_timeout`).
    pub empty_timeout: Duration,
    /// Close a room this long after its last participant left (`room.departure_timeout`).
    pub departure_timeout: Duration,
    /// Maximum participants per room, 0 = unlimited (`room.max_participants`).
    pub max_participants: u32,
    /// Create rooms on first join (`room.auto_create`).
    pub auto_create: bool,
    /// Maximum open rooms (`limit.max_rooms`).
    pub max_rooms: usize,
    /// Maximum published tracks per participant (`limit.max_tracks_per_participant`).
    pub max_tracks_per_participant: usize,
    /// Maximum size of one data packet in bytes (`limit.max_data_packet_bytes`).
    pub max_data_packet_bytes: usize,
    /// Maximum metadata size in bytes (`limit.max_metadata_bytes`).
    pub max_metadata_bytes: usize,
    /// Signal messages queued towards one client before it is disconnected as too slow
    /// (`limit.signal_queue`).
    pub signal_queue: usize,
    /// Seconds between client pings (sent to clients in JoinResponse).
    pub ping_interval: u32,
    /// Seconds without any client message before the session is dropped.
    pub ping_timeout: u32,
    /// Room policy: forward only the video of the N most recent speakers (0 = off,
    /// `room.last_n`).
    pub last_n: usize,
    /// Room policy: participants joining after this many receive audio only (0 = off,
    /// `room.audio_only_after`).
    pub audio_only_after: usize,
    /// Node id and region reported to clients.
    pub node_id: String,
    pub region: String,
    /// Let the server API unmute a participant's track (`room.enable_remote_unmute`);
    /// muting is always allowed.
    pub enable_remote_unmute: bool,
    /// Where rooms report lifecycle events (webhooks); the default discards them.
    pub events: crate::events::EventSink,
}

impl Default for RoomSettings {
    fn default() -> Self {
        RoomSettings {
            empty_timeout: Duration::from_secs(300),
            departure_timeout: Duration::from_secs(20),
            max_participants: 0,
            auto_create: true,
            max_rooms: 10_000,
            max_tracks_per_participant: 32,
            max_data_packet_bytes: 64 * 1024,
            max_metadata_bytes: 64 * 1024,
            signal_queue: 1024,
            ping_interval: 5,
            ping_timeout: 15,
            last_n: 0,
            audio_only_after: 0,
            node_id: "ND_local".into(),
            region: String::new(),
            enable_remote_unmute: false,
            events: crate::events::EventSink::default(),
        }
    }
}
