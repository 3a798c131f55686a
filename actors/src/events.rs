//! Room lifecycle events (the source of webhooks).
//!
//! Rooms describe what happened as LiveKit `WebhookEvent`s (`room_started`, `participant_joined`,
//! `track_published`, ...) and hand them to an [`EventSink`]. The sink never blocks and never
//! allocates without bound: it holds one bounded queue per webhook URL and uses `try_send`, so a
//! slow or dead receiver can only lose its own events (counted, and reported to that receiver as
//! `num_dropped` on the next event it does get), never stall a room.
//!
//! Delivery (HTTP, signing, retries) lives in the binary (`src/webhook.rs`); this crate only
//! produces events, in the order the room actor decided them.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use livekit_protocol as lk;
use tokio::sync::mpsc;

use crate::ids::new_sid;
use crate::metrics::METRICS;

/// The event names LiveKit uses (`WebhookEvent.event`).
pub mod names {
    pub const ROOM_STARTED: &str = "room_started";
    pub const ROOM_FINISHED: &str = "room_finished";
    pub const PARTICIPANT_JOINED: &str = "participant_joined";
    pub const PARTICIPANT_LEFT: &str = "participant_left";
    /// A participant left before it ever became active (no `participant_joined` was sent).
    pub const PARTICIPANT_CONNECTION_ABORTED: &str = "participant_connection_aborted";
    pub const TRACK_PUBLISHED: &str = "track_published";
    pub const TRACK_UNPUBLISHED: &str = "track_unpublished";
}

/// One destination's queue as seen by producers.
#[derive(Debug)]
struct Lane {
    tx: mpsc::Sender<lk::WebhookEvent>,
    /// Events that did not fit into `tx`; the consumer adds them to `num_dropped`.
    lost: Arc<AtomicU64>,
}

/// Where rooms put their events. Cloning is cheap; the default sink discards everything
/// (no webhook configured).
#[derive(Debug, Clone, Default)]
pub struct EventSink {
    lanes: Arc<Vec<Lane>>,
}

/// The consumer end of one destination's queue.
#[derive(Debug)]
pub struct EventLane {
    pub rx: mpsc::Receiver<lk::WebhookEvent>,
    /// Events dropped because the queue was full (read and reset by the consumer).
    pub lost: Arc<AtomicU64>,
}

impl EventSink {
    /// A sink with `destinations` independent queues of `capacity` events each.
    pub fn new(destinations: usize, capacity: usize) -> (EventSink, Vec<EventLane>) {
        let mut lanes = Vec::with_capacity(destinations);
        let mut consumers = Vec::with_capacity(destinations);
        for _ in 0..destinations {
            let (tx, rx) = mpsc::channel(capacity.max(1));
            let lost = Arc::new(AtomicU64::new(0));
            lanes.push(Lane {
                tx,
                lost: lost.clone(),
            });
            consumers.push(EventLane { rx, lost });
        }
        (
            EventSink {
                lanes: Arc::new(lanes),
            },
            consumers,
        )
    }

    /// True when at least one destination is configured.
    pub fn enabled(&self) -> bool {
        !self.lanes.is_empty()
    }

    /// Queue an event for every destination; never blocks.
    pub fn emit(
        &self,
        event: &str,
        room: &lk::Room,
        participant: Option<&lk::ParticipantInfo>,
        track: Option<&lk::TrackInfo>,
    ) {
        if self.lanes.is_empty() {
            return;
        }
        let ev = lk::WebhookEvent {
            event: event.to_string(),
            room: Some(room.clone()),
            participant: participant.cloned(),
            track: track.cloned(),
            id: new_sid("EV_"),
            created_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0),
            ..Default::default()
        };
        for lane in self.lanes.iter() {
            match lane.tx.try_send(ev.clone()) {
                Ok(()) => {
                    METRICS.webhook_queued.fetch_add(1, Relaxed);
                }
                Err(_) => {
                    lane.lost.fetch_add(1, Relaxed);
                    METRICS.webhook_dropped.fetch_add(1, Relaxed);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_lane_counts_drops_and_never_blocks() {
        let (sink, mut lanes) = EventSink::new(2, 2);
        let room = lk::Room {
            name: "r".into(),
            ..Default::default()
        };
        for _ in 0..5 {
            sink.emit(names::ROOM_STARTED, &room, None, None);
        }
        for lane in &mut lanes {
            assert_eq!(lane.lost.load(Relaxed), 3);
            let ev = lane.rx.try_recv().unwrap();
            assert_eq!(ev.event, "room_started");
            assert!(ev.id.starts_with("EV_"));
        }
        // The default sink has no destinations and discards.
        EventSink::default().emit(names::ROOM_FINISHED, &room, None, None);
    }
}
