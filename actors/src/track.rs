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

/// One published track.
pub struct Track {
    info: lk::TrackInfo,
    publisher_sid: String,
    key: TrackKey,
    media: MediaHandle,
    /// Subscriber participant sid → its subscriber peer.
    subscribers: BTreeMap<String, PeerId>,
    span: tracing::Span,
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
        let span = tracing::info_span!(parent: room_span, "track", sid = %info.sid, kind = info.r#type);
        Track {
            info,
            publisher_sid,
            key,
            media,
            subscribers: BTreeMap::new(),
            span,
        }
    }
}

impl Actor for Track {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(256);
        METRICS.tracks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(parent: &self.span, "track published");
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        METRICS.tracks.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
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
                self.subscribers.insert(msg.participant_sid, msg.peer);
            }
            Err(e) => tracing::warn!(parent: &self.span, error = %e, "subscribe failed"),
        }
    }
}

impl Handler<RemoveSubscriber> for Track {
    type Result = ();
    fn handle(&mut self, msg: RemoveSubscriber, _ctx: &mut Self::Context) {
        if let Some(peer) = self.subscribers.remove(&msg.participant_sid) {
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

impl Handler<SetMuted> for Track {
    type Result = ();
    fn handle(&mut self, msg: SetMuted, _ctx: &mut Self::Context) {
        self.info.muted = msg.0;
    }
}
