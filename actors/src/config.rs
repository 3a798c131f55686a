//! Control-plane settings handed to rooms and participants (filled from the server config).

use std::collections::BTreeMap;
use std::time::Duration;

/// The media policies of one room (issue 4, "room policies"). Both are off (0) by default.
///
/// Server-wide defaults come from `room.last_n` / `room.audio_only_after`; a room created with
/// LiveKit's `CreateRoom` and a `room_preset` naming an entry of `room.presets` uses that
/// preset's values instead.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoomPolicy {
    /// Forward only the video of the N most recent speakers (0 = off).
    pub last_n: usize,
    /// Participants joining after this many receive audio only (0 = off).
    pub audio_only_after: usize,
}

impl RoomPolicy {
    /// Largest value accepted for either policy (a room never has more members than this).
    pub const MAX: usize = 100_000;

    /// Parses a preset's text, `last_n=4 audio_only_after=50` (space- or `;`-separated
    /// `key=value` pairs; a key left out is off). Errors name the offending part.
    pub fn parse(text: &str) -> Result<RoomPolicy, String> {
        let mut p = RoomPolicy::default();
        for item in text
            .split([' ', ';'])
            .map(str::trim)
            .filter(|i| !i.is_empty())
        {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| format!("expected `key=value`, got `{item}`"))?;
            let n: usize = v
                .trim()
                .parse()
                .map_err(|_| format!("`{k}` needs a whole number, got `{v}`"))?;
            if n > Self::MAX {
                return Err(format!("`{k}` = {n} is above {}", Self::MAX));
            }
            match k.trim() {
                "last_n" => p.last_n = n,
                "audio_only_after" => p.audio_only_after = n,
                other => {
                    return Err(format!(
                        "unknown policy `{other}` (known: last_n, audio_only_after)"
                    ))
                }
            }
        }
        Ok(p)
    }
}

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
    /// Named policy sets a room can be created with (`CreateRoom.room_preset`, config
    /// `room.presets`).
    pub presets: BTreeMap<String, RoomPolicy>,
    /// Node id and region reported to clients.
    pub node_id: String,
    pub region: String,
    /// Let the server API unmute a participant's track (`room.enable_remote_unmute`);
    /// muting is always allowed.
    pub enable_remote_unmute: bool,
    /// Offer the scalable codecs VP9 and AV1 to publishers (`enabled_publish_codecs` of the
    /// JoinResponse) besides VP8 and H.264. On in RTP mode (`rtc.rtp_mode`), where the engine
    /// thins a VP9 SVC stream's spatial layers per subscriber; frame mode forwards only what
    /// it can depacketise and repacketise, so clients are steered to VP8 there.
    pub scalable_codecs: bool,
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
            presets: BTreeMap::new(),
            node_id: "ND_local".into(),
            region: String::new(),
            enable_remote_unmute: false,
            scalable_codecs: true,
            events: crate::events::EventSink::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::RoomPolicy;

    #[test]
    fn policy_text_parses_and_errors_name_the_part() {
        assert_eq!(
            RoomPolicy::parse("last_n=4 audio_only_after=50"),
            Ok(RoomPolicy {
                last_n: 4,
                audio_only_after: 50
            })
        );
        assert_eq!(RoomPolicy::parse("  "), Ok(RoomPolicy::default()));
        assert_eq!(
            RoomPolicy::parse("audio_only_after=2;last_n=0").map(|p| p.audio_only_after),
            Ok(2)
        );
        assert!(RoomPolicy::parse("last_n")
            .unwrap_err()
            .contains("key=value"));
        assert!(RoomPolicy::parse("last_n=-1")
            .unwrap_err()
            .contains("last_n"));
        assert!(RoomPolicy::parse("bogus=1").unwrap_err().contains("bogus"));
        assert!(RoomPolicy::parse("last_n=999999999").is_err());
    }
}
