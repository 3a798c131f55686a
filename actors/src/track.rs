//! The Track actor: one published track, its subscriber list, and its forwarding state.
//!
//! The actor decides *who* receives the track; the media engine does the receiving and
//! sending. Adding or removing a subscriber is one command to the engine, which renegotiates
//! the subscriber's peer connection.

use std::collections::BTreeMap;

use actix::prelude::*;
use livekit_protocol as lk;

use crate::media::{Command, MediaHandle, PeerId, TrackKey};
use crate::metrics::METRICS;
use crate::participant::{Participant, SendSignal};

/// One published track.
pub struct Track {
    info: lk::TrackInfo,
    publisher_sid: String,
    key: TrackKey,
    media: MediaHandle,
    /// Subscriber participant sid → its subscription.
    subscribers: BTreeMap<String, Sub>,
    /// A room policy's cap on every subscriber (last-N: 0 when the publisher is not among
    /// the N most recent speakers).
    policy_cap: u8,
    /// The publisher, told which layers anyone needs (dynacast).
    publisher: Option<Addr<Participant>>,
    /// The last set of needed qualities sent to the publisher.
    published_qualities: Option<[bool; 3]>,
    /// Relay fabric: the best layer each downstream room link needs (link id → rank 1..=3).
    remote_needs: BTreeMap<u64, u8>,
    /// Relayed track: where this node's own need goes (the room, which tells upstream).
    need_sink: Option<Recipient<RelayNeed>>,
    /// The last need sent to `need_sink`.
    sent_need: Option<u8>,
    span: tracing::Span,
}

/// Relayed track → room: the best layer this node's viewers need (0: none), for dynacast
/// across the tree.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RelayNeed {
    pub track_sid: String,
    pub rank: u8,
}

/// Room → track: the best layer a downstream room link needs (0: the link no longer wants it).
#[derive(Message)]
#[rtype(result = "()")]
pub struct RemoteNeed {
    pub link: u64,
    pub rank: u8,
}

/// One subscriber of a track.
#[derive(Debug, Clone, Copy)]
struct Sub {
    peer: PeerId,
    /// The best layer rank the subscriber asked for (0: disabled).
    requested: u8,
    /// A room policy's cap for this subscriber (audio-only participants: 0).
    cap: u8,
    /// The rank last sent to the media engine.
    applied: u8,
    /// The frame rate the subscriber asked for (`UpdateTrackSettings.fps`, 0: all).
    fps: u32,
    /// The frame rate last sent to the media engine.
    applied_fps: u32,
}

/// The best layer rank (1 low, 2 medium, 3 high) that satisfies a subscriber's settings, given
/// the publisher's layers. `None` fields mean "no constraint".
pub fn rank_for_settings(
    layers: &[lk::VideoLayer],
    quality: Option<i32>,
    width: u32,
    height: u32,
) -> u8 {
    if width > 0 || height > 0 {
        // The smallest layer at least as large as the requested size; the best if none is.
        let mut sorted: Vec<&lk::VideoLayer> = layers.iter().collect();
        sorted.sort_by_key(|l| l.quality);
        for l in &sorted {
            if l.width >= width && l.height >= height {
                return (l.quality.clamp(0, 2) + 1) as u8;
            }
        }
        return 3;
    }
    match quality {
        Some(q) if (0..=2).contains(&q) => (q + 1) as u8,
        _ => 3,
    }
}

impl Track {
    /// A new track actor (not started).
    pub fn new(
        info: lk::TrackInfo,
        publisher_sid: String,
        key: TrackKey,
        media: MediaHandle,
        room_span: &tracing::Span,
    ) -> Self {
        let span =
            tracing::info_span!(parent: room_span, "track", sid = %info.sid, kind = info.r#type);
        Track {
            info,
            publisher_sid,
            key,
            media,
            subscribers: BTreeMap::new(),
            policy_cap: 3,
            publisher: None,
            published_qualities: None,
            remote_needs: BTreeMap::new(),
            need_sink: None,
            sent_need: None,
            span,
        }
    }

    /// A relayed track: report this node's need for layers to `sink` (see [`RelayNeed`]).
    pub fn with_need_sink(mut self, sink: Recipient<RelayNeed>) -> Self {
        self.need_sink = Some(sink);
        self
    }

    /// Tell the publisher which simulcast layers any subscriber needs (dynacast).
    pub fn with_publisher(mut self, publisher: Addr<Participant>) -> Self {
        self.publisher = Some(publisher);
        self
    }

    /// Send a subscriber's effective rank to the engine if it changed.
    fn apply(&mut self, participant_sid: &str) {
        let policy = self.policy_cap;
        let Some(sub) = self.subscribers.get_mut(participant_sid) else {
            return;
        };
        let effective = sub.requested.min(sub.cap).min(policy);
        if effective == sub.applied && sub.fps == sub.applied_fps {
            return;
        }
        sub.applied = effective;
        sub.applied_fps = sub.fps;
        let fps = sub.fps;
        let _ = self.media.send(Command::SetTrackSettings {
            sub: sub.peer,
            track: self.key,
            max_rank: effective,
            fps,
        });
        tracing::debug!(parent: &self.span, subscriber = %participant_sid, rank = effective, fps, "subscriber layer cap");
    }

    fn update_dynacast(&mut self) {
        if self.info.r#type != lk::TrackType::Video as i32 {
            return;
        }
        let best = self
            .subscribers
            .values()
            .map(|s| s.applied)
            .chain(self.remote_needs.values().copied())
            .max()
            .unwrap_or(0);
        if let Some(sink) = &self.need_sink {
            if self.sent_need != Some(best) {
                self.sent_need = Some(best);
                sink.do_send(RelayNeed {
                    track_sid: self.info.sid.clone(),
                    rank: best,
                });
            }
        }
        // Low is always kept on while anyone subscribes (cheap, and the fallback layer).
        let needed = [best >= 1, best >= 2, best >= 3];
        if self.published_qualities == Some(needed) {
            return;
        }
        self.published_qualities = Some(needed);
        let Some(p) = &self.publisher else { return };
        let qualities: Vec<lk::SubscribedQuality> = needed
            .iter()
            .enumerate()
            .map(|(i, on)| lk::SubscribedQuality {
                quality: i as i32,
                enabled: *on,
            })
            .collect();
        let codec = self
            .info
            .mime_type
            .split('/')
            .nth(1)
            .unwrap_or("vp8")
            .to_ascii_lowercase();
        tracing::debug!(parent: &self.span, ?needed, "dynacast: subscribed qualities changed");
        #[allow(deprecated)]
        p.do_send(SendSignal(
            lk::signal_response::Message::SubscribedQualityUpdate(lk::SubscribedQualityUpdate {
                track_sid: self.info.sid.clone(),
                subscribed_qualities: qualities.clone(),
                subscribed_codecs: vec![lk::SubscribedCodec { codec, qualities }],
            }),
        ));
    }
}

impl Actor for Track {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(256);
        METRICS
            .tracks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(parent: &self.span, "track published");
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        METRICS
            .tracks
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        let _ = self.media.send(Command::UnbindTrack { track: self.key });
        tracing::info!(parent: &self.span, "track closed");
    }
}

/// Start forwarding this track to a participant.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AddSubscriber {
    pub participant_sid: String,
    pub peer: PeerId,
    /// Room-policy cap on the layers this subscriber gets (3: none; 0: audio only).
    pub cap: u8,
}

/// Stop forwarding this track to a participant.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RemoveSubscriber {
    pub participant_sid: String,
    /// The subscriber's peer is already gone; do not renegotiate it.
    pub peer_gone: bool,
}

/// The track is unpublished: stop forwarding everywhere and stop the actor.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CloseTrack;

/// Update the track's muted flag (kept for new subscribers' bookkeeping).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetMuted(pub bool);

impl Handler<AddSubscriber> for Track {
    type Result = ();
    fn handle(&mut self, msg: AddSubscriber, _ctx: &mut Self::Context) {
        if self.subscribers.contains_key(&msg.participant_sid) {
            return;
        }
        let cmd = Command::Subscribe {
            sub: msg.peer,
            track: self.key,
            stream_id: format!("{}|{}", self.publisher_sid, self.info.sid),
            track_id: self.info.sid.clone(),
        };
        match self.media.send(cmd) {
            Ok(()) => {
                tracing::debug!(parent: &self.span, subscriber = %msg.participant_sid, "subscribed");
                let sid = msg.participant_sid.clone();
                self.subscribers.insert(
                    msg.participant_sid,
                    Sub {
                        peer: msg.peer,
                        requested: 3,
                        cap: msg.cap,
                        applied: 3,
                        fps: 0,
                        applied_fps: 0,
                    },
                );
                self.apply(&sid);
                self.update_dynacast();
            }
            Err(e) => tracing::warn!(parent: &self.span, error = %e, "subscribe failed"),
        }
    }
}

impl Handler<RemoveSubscriber> for Track {
    type Result = ();
    fn handle(&mut self, msg: RemoveSubscriber, _ctx: &mut Self::Context) {
        if let Some(Sub { peer, .. }) = self.subscribers.remove(&msg.participant_sid) {
            self.update_dynacast();
            if !msg.peer_gone {
                let _ = self.media.send(Command::Unsubscribe {
                    sub: peer,
                    track: self.key,
                });
            }
            tracing::debug!(parent: &self.span, subscriber = %msg.participant_sid, "unsubscribed");
        }
    }
}

impl Handler<CloseTrack> for Track {
    type Result = ();
    fn handle(&mut self, _msg: CloseTrack, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

impl Handler<RemoteNeed> for Track {
    type Result = ();
    fn handle(&mut self, msg: RemoteNeed, _ctx: &mut Self::Context) {
        if msg.rank == 0 {
            self.remote_needs.remove(&msg.link);
        } else {
            self.remote_needs.insert(msg.link, msg.rank.min(3));
        }
        self.update_dynacast();
    }
}

impl Handler<SetMuted> for Track {
    type Result = ();
    fn handle(&mut self, msg: SetMuted, _ctx: &mut Self::Context) {
        self.info.muted = msg.0;
    }
}

/// A subscriber's `UpdateTrackSettings` for this track.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SubscriberSettings {
    pub participant_sid: String,
    pub disabled: bool,
    pub quality: Option<i32>,
    pub width: u32,
    pub height: u32,
    /// Frames per second (0: all).
    pub fps: u32,
}

impl Handler<SubscriberSettings> for Track {
    type Result = ();
    fn handle(&mut self, msg: SubscriberSettings, _ctx: &mut Self::Context) {
        #[allow(deprecated)]
        let rank = if msg.disabled {
            0
        } else {
            rank_for_settings(&self.info.layers, msg.quality, msg.width, msg.height)
        };
        let Some(sub) = self.subscribers.get_mut(&msg.participant_sid) else {
            return;
        };
        sub.requested = rank;
        sub.fps = msg.fps;
        self.apply(&msg.participant_sid);
        self.update_dynacast();
    }
}

/// A room policy caps what one subscriber (or, with `participant_sid: None`, every subscriber)
/// receives of this track.
#[derive(Message)]
#[rtype(result = "()")]
pub struct PolicyCap {
    pub participant_sid: Option<String>,
    pub cap: u8,
}

impl Handler<PolicyCap> for Track {
    type Result = ();
    fn handle(&mut self, msg: PolicyCap, _ctx: &mut Self::Context) {
        let sids: Vec<String> = match msg.participant_sid {
            Some(sid) => {
                if let Some(s) = self.subscribers.get_mut(&sid) {
                    s.cap = msg.cap;
                }
                vec![sid]
            }
            None => {
                self.policy_cap = msg.cap;
                self.subscribers.keys().cloned().collect()
            }
        };
        for sid in sids {
            self.apply(&sid);
        }
        self.update_dynacast();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layers() -> Vec<lk::VideoLayer> {
        [(0, 320, 180), (1, 640, 360), (2, 1280, 720)]
            .iter()
            .map(|(q, w, h)| lk::VideoLayer {
                quality: *q,
                width: *w,
                height: *h,
                ..Default::default()
            })
            .collect()
    }

    #[test]
    fn dimensions_pick_the_smallest_sufficient_layer() {
        assert_eq!(rank_for_settings(&layers(), None, 320, 180), 1);
        assert_eq!(rank_for_settings(&layers(), None, 400, 200), 2);
        assert_eq!(rank_for_settings(&layers(), None, 1920, 1080), 3);
        assert_eq!(rank_for_settings(&layers(), Some(0), 0, 0), 1);
        assert_eq!(rank_for_settings(&layers(), Some(2), 0, 0), 3);
        assert_eq!(rank_for_settings(&layers(), None, 0, 0), 3);
    }
}
