//! The Room actor: the authoritative state of one room — its participants (with their
//! `ParticipantInfo` and its growing `version`), its tracks and who subscribes to what.
//!
//! Every change to a participant goes through the room, which bumps the version and broadcasts
//! a `ParticipantUpdate`. Subscriptions are decided here and carried out by [`Track`] actors.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use livekit_protocol as lk;
use lk::signal_response::Message as Resp;

use crate::config::RoomSettings;
use crate::error::RoomError;
use crate::ids::new_sid;
use crate::manager::{RoomManager, RoomStopped};
use crate::media::{Command, MediaHandle, PeerId, TrackKey};
use crate::metrics::METRICS;
use crate::participant::{Kick, Participant, SendSignal};
use crate::track::{
    AddSubscriber, CloseTrack, RemoveSubscriber, SetMuted, SubscriberSettings, Track,
};

/// Cadence of `SpeakersChanged` updates.
const SPEAKER_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);
/// Cadence of `ConnectionQualityUpdate` broadcasts.
const QUALITY_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);
/// A speaker's level change smaller than this is not worth a message.
const LEVEL_EPSILON: f32 = 0.05;

struct Member {
    info: lk::ParticipantInfo,
    addr: Addr<Participant>,
    sub_peer: PeerId,
    auto_subscribe: bool,
    hidden: bool,
    /// Tracks this member subscribes to.
    subscriptions: BTreeSet<String>,
}

struct TrackEntry {
    addr: Addr<Track>,
    publisher_sid: String,
}

/// One room. See the module documentation.
pub struct Room {
    info: lk::Room,
    settings: Arc<RoomSettings>,
    media: MediaHandle,
    manager: Addr<RoomManager>,
    members: BTreeMap<String, Member>,
    tracks: BTreeMap<String, TrackEntry>,
    close_timer: Option<SpawnHandle>,
    /// Participant sid → track sid → (level, active), from the media engine's meters.
    levels: BTreeMap<String, BTreeMap<String, (f32, bool)>>,
    /// What clients were last told about each speaker.
    sent_speakers: BTreeMap<String, (f32, bool)>,
    /// Participant sid → (quality, score).
    qualities: BTreeMap<String, (i32, f32)>,
    span: tracing::Span,
}

/// A room's public summary.
#[derive(Debug, Clone)]
pub struct RoomSummary {
    pub info: lk::Room,
    pub participants: Vec<lk::ParticipantInfo>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Room {
    /// A new room actor (not started).
    pub fn new(
        name: String,
        settings: Arc<RoomSettings>,
        media: MediaHandle,
        manager: Addr<RoomManager>,
    ) -> Self {
        let ms = now_ms();
        let info = lk::Room {
            sid: new_sid("RM_"),
            name,
            empty_timeout: settings.empty_timeout.as_secs() as u32,
            departure_timeout: settings.departure_timeout.as_secs() as u32,
            max_participants: settings.max_participants,
            creation_time: ms / 1000,
            creation_time_ms: ms,
            ..Default::default()
        };
        let span = tracing::info_span!("room", name = %info.name, sid = %info.sid);
        Room {
            info,
            settings,
            media,
            manager,
            members: BTreeMap::new(),
            tracks: BTreeMap::new(),
            close_timer: None,
            levels: BTreeMap::new(),
            sent_speakers: BTreeMap::new(),
            qualities: BTreeMap::new(),
            span,
        }
    }

    fn room_info(&self) -> lk::Room {
        let mut r = self.info.clone();
        r.num_participants = self.members.values().filter(|m| !m.hidden).count() as u32;
        r.num_publishers = self
            .members
            .values()
            .filter(|m| !m.hidden && m.info.is_publisher)
            .count() as u32;
        r
    }

    /// Send the member's current info to everyone (hidden members are never announced, but
    /// always hear about themselves).
    fn broadcast_info(&self, sid: &str) {
        let Some(m) = self.members.get(sid) else {
            return;
        };
        let update = Resp::Update(lk::ParticipantUpdate {
            participants: vec![m.info.clone()],
        });
        for (other_sid, other) in &self.members {
            if m.hidden && other_sid != sid {
                continue;
            }
            other.addr.do_send(SendSignal(update.clone()));
        }
    }

    fn bump(&mut self, sid: &str) {
        if let Some(m) = self.members.get_mut(sid) {
            m.info.version += 1;
        }
    }

    fn subscribe(&mut self, subscriber_sid: &str, track_sid: &str) {
        let Some(t) = self.tracks.get(track_sid) else {
            return;
        };
        if t.publisher_sid == subscriber_sid {
            return;
        }
        let Some(m) = self.members.get_mut(subscriber_sid) else {
            return;
        };
        let can_subscribe = m.info.permission.as_ref().is_none_or(|p| p.can_subscribe);
        if !can_subscribe {
            return;
        }
        if m.subscriptions.insert(track_sid.to_string()) {
            t.addr.do_send(AddSubscriber {
                participant_sid: subscriber_sid.to_string(),
                peer: m.sub_peer,
            });
        }
    }

    fn unsubscribe(&mut self, subscriber_sid: &str, track_sid: &str, peer_gone: bool) {
        let Some(m) = self.members.get_mut(subscriber_sid) else {
            return;
        };
        if m.subscriptions.remove(track_sid) {
            if let Some(t) = self.tracks.get(track_sid) {
                t.addr.do_send(RemoveSubscriber {
                    participant_sid: subscriber_sid.to_string(),
                    peer_gone,
                });
            }
        }
    }

    fn remove_track(&mut self, track_sid: &str) {
        if let Some(t) = self.tracks.remove(track_sid) {
            t.addr.do_send(CloseTrack);
        }
        for m in self.members.values_mut() {
            m.subscriptions.remove(track_sid);
        }
    }

    /// Send `SpeakersChanged` with what changed since the last update.
    fn send_speakers(&mut self) {
        let mut changed = Vec::new();
        let mut current: BTreeMap<String, (f32, bool)> = BTreeMap::new();
        for (sid, tracks) in &self.levels {
            if self.members.get(sid).is_none_or(|m| m.hidden) {
                continue;
            }
            let level = tracks.values().map(|(l, _)| *l).fold(0.0f32, f32::max);
            let active = tracks.values().any(|(_, a)| *a);
            current.insert(sid.clone(), (level, active));
        }
        for (sid, (level, active)) in &current {
            let prev = self.sent_speakers.get(sid).copied().unwrap_or((0.0, false));
            if prev.1 != *active || (*active && (prev.0 - level).abs() > LEVEL_EPSILON) {
                changed.push(lk::SpeakerInfo {
                    sid: sid.clone(),
                    level: if *active { *level } else { 0.0 },
                    active: *active,
                });
            }
        }
        for (sid, (_, was_active)) in &self.sent_speakers {
            if *was_active && !current.contains_key(sid) {
                changed.push(lk::SpeakerInfo {
                    sid: sid.clone(),
                    level: 0.0,
                    active: false,
                });
            }
        }
        if changed.is_empty() {
            return;
        }
        for c in &changed {
            self.sent_speakers
                .insert(c.sid.clone(), (c.level, c.active));
        }
        self.sent_speakers
            .retain(|sid, _| current.contains_key(sid));
        let msg = Resp::SpeakersChanged(lk::SpeakersChanged { speakers: changed });
        for m in self.members.values() {
            m.addr.do_send(SendSignal(msg.clone()));
        }
    }

    fn send_qualities(&self) {
        let updates: Vec<lk::ConnectionQualityInfo> = self
            .qualities
            .iter()
            .filter(|(sid, _)| self.members.get(*sid).is_some_and(|m| !m.hidden))
            .map(|(sid, (q, score))| lk::ConnectionQualityInfo {
                participant_sid: sid.clone(),
                quality: *q,
                score: *score,
            })
            .collect();
        if updates.is_empty() {
            return;
        }
        let msg = Resp::ConnectionQuality(lk::ConnectionQualityUpdate { updates });
        for m in self.members.values() {
            m.addr.do_send(SendSignal(msg.clone()));
        }
    }

    fn schedule_close(&mut self, ctx: &mut Context<Self>, after: std::time::Duration) {
        if let Some(h) = self.close_timer.take() {
            ctx.cancel_future(h);
        }
        self.close_timer = Some(ctx.run_later(after, |room, ctx| {
            if room.members.is_empty() {
                tracing::info!(parent: &room.span, "room empty; closing");
                ctx.stop();
            }
        }));
    }
}

impl Actor for Room {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(1024);
        METRICS
            .rooms
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(parent: &self.span, "room started");
        self.schedule_close(ctx, self.settings.empty_timeout);
        ctx.run_interval(SPEAKER_INTERVAL, |room, _| room.send_speakers());
        ctx.run_interval(QUALITY_INTERVAL, |room, _| room.send_qualities());
    }

    fn stopped(&mut self, ctx: &mut Self::Context) {
        METRICS
            .rooms
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        for (_, t) in std::mem::take(&mut self.tracks) {
            t.addr.do_send(CloseTrack);
        }
        for m in self.members.values() {
            m.addr.do_send(Kick {
                reason: lk::DisconnectReason::RoomClosed,
            });
        }
        self.manager.do_send(RoomStopped {
            name: self.info.name.clone(),
            addr: ctx.address(),
        });
        tracing::info!(parent: &self.span, "room closed");
    }
}

/// A participant asks to join. Replies with the room and the other (visible) participants.
#[derive(Message)]
#[rtype(result = "Result<(lk::Room, Vec<lk::ParticipantInfo>), RoomError>")]
pub struct Join {
    pub info: lk::ParticipantInfo,
    pub addr: Addr<Participant>,
    pub sub_peer: PeerId,
    pub auto_subscribe: bool,
    pub hidden: bool,
}

/// The span of this room, for child spans.
#[derive(Message)]
#[rtype(result = "tracing::Span")]
pub struct GetSpan;

/// A participant left (or was disconnected).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Leave {
    pub sid: String,
    pub reason: lk::DisconnectReason,
}

/// A participant published a track (its media is bound in the engine under `key`).
#[derive(Message)]
#[rtype(result = "()")]
pub struct PublishTrack {
    pub sid: String,
    pub track: lk::TrackInfo,
    pub key: TrackKey,
}

/// A participant unpublished a track.
#[derive(Message)]
#[rtype(result = "()")]
pub struct UnpublishTrack {
    pub sid: String,
    pub track_sid: String,
}

/// A participant muted or unmuted one of its tracks.
#[derive(Message)]
#[rtype(result = "()")]
pub struct MuteTrack {
    pub sid: String,
    pub track_sid: String,
    pub muted: bool,
}

/// A participant's connection state changed (e.g. became ACTIVE).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetState {
    pub sid: String,
    pub state: lk::participant_info::State,
}

/// A participant updated its own name / metadata / attributes.
#[derive(Message)]
#[rtype(result = "()")]
pub struct UpdateMetadata {
    pub sid: String,
    pub update: lk::UpdateParticipantMetadata,
}

/// Subscribe / unsubscribe a participant to tracks.
#[derive(Message)]
#[rtype(result = "()")]
pub struct UpdateSubscription {
    pub sid: String,
    pub track_sids: Vec<String>,
    pub subscribe: bool,
}

/// Forward a data packet (already stamped with the sender's identity) to its destinations.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RouteData {
    pub from_sid: String,
    pub reliable: bool,
    /// Destination identities; empty means everyone else.
    pub destinations: Vec<String>,
    pub data: Vec<u8>,
}

/// Current room summary.
#[derive(Message)]
#[rtype(result = "RoomSummary")]
pub struct Summarize;

impl Handler<GetSpan> for Room {
    type Result = MessageResult<GetSpan>;
    fn handle(&mut self, _msg: GetSpan, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(self.span.clone())
    }
}

impl Handler<Join> for Room {
    type Result = Result<(lk::Room, Vec<lk::ParticipantInfo>), RoomError>;

    fn handle(&mut self, msg: Join, ctx: &mut Self::Context) -> Self::Result {
        // A second session with the same identity evicts the first.
        let dup: Vec<String> = self
            .members
            .iter()
            .filter(|(_, m)| m.info.identity == msg.info.identity)
            .map(|(sid, _)| sid.clone())
            .collect();
        for sid in dup {
            if let Some(m) = self.members.get(&sid) {
                m.addr.do_send(Kick {
                    reason: lk::DisconnectReason::DuplicateIdentity,
                });
            }
            self.handle(
                Leave {
                    sid,
                    reason: lk::DisconnectReason::DuplicateIdentity,
                },
                ctx,
            );
        }
        let max = self.settings.max_participants;
        if max > 0 && self.members.len() as u32 >= max {
            return Err(RoomError::RoomFull(max));
        }
        if let Some(h) = self.close_timer.take() {
            ctx.cancel_future(h);
        }
        let sid = msg.info.sid.clone();
        let others: Vec<lk::ParticipantInfo> = self
            .members
            .values()
            .filter(|m| !m.hidden)
            .map(|m| m.info.clone())
            .collect();
        tracing::info!(parent: &self.span, participant = %sid, identity = %msg.info.identity, "participant joined");
        self.members.insert(
            sid.clone(),
            Member {
                info: msg.info,
                addr: msg.addr,
                sub_peer: msg.sub_peer,
                auto_subscribe: msg.auto_subscribe,
                hidden: msg.hidden,
                subscriptions: BTreeSet::new(),
            },
        );
        // Announce the newcomer to the others.
        if let Some(m) = self.members.get(&sid) {
            if !m.hidden {
                let update = Resp::Update(lk::ParticipantUpdate {
                    participants: vec![m.info.clone()],
                });
                for (other_sid, other) in &self.members {
                    if *other_sid != sid {
                        other.addr.do_send(SendSignal(update.clone()));
                    }
                }
            }
        }
        // Subscribe the newcomer to every existing track (after the JoinResponse goes out,
        // because the participant waits for this reply before handling anything else).
        if msg.auto_subscribe {
            let existing: Vec<String> = self.tracks.keys().cloned().collect();
            for t in existing {
                self.subscribe(&sid, &t);
            }
        }
        Ok((self.room_info(), others))
    }
}

impl Handler<Leave> for Room {
    type Result = ();
    fn handle(&mut self, msg: Leave, ctx: &mut Self::Context) {
        let Some(mut m) = self.members.remove(&msg.sid) else {
            return;
        };
        self.levels.remove(&msg.sid);
        self.qualities.remove(&msg.sid);
        tracing::info!(parent: &self.span, participant = %msg.sid, reason = ?msg.reason, "participant left");
        // Its subscriptions end with its peer; its tracks end for everyone.
        for t in std::mem::take(&mut m.subscriptions) {
            if let Some(te) = self.tracks.get(&t) {
                te.addr.do_send(RemoveSubscriber {
                    participant_sid: msg.sid.clone(),
                    peer_gone: true,
                });
            }
        }
        let published: Vec<String> = self
            .tracks
            .iter()
            .filter(|(_, t)| t.publisher_sid == msg.sid)
            .map(|(sid, _)| sid.clone())
            .collect();
        for t in published {
            self.remove_track(&t);
        }
        if !m.hidden {
            m.info.state = lk::participant_info::State::Disconnected as i32;
            m.info.disconnect_reason = msg.reason as i32;
            m.info.version += 1;
            m.info.tracks.clear();
            let update = Resp::Update(lk::ParticipantUpdate {
                participants: vec![m.info],
            });
            for other in self.members.values() {
                other.addr.do_send(SendSignal(update.clone()));
            }
        }
        if self.members.is_empty() {
            let after = self.settings.departure_timeout;
            self.schedule_close(ctx, after);
        }
    }
}

impl Handler<PublishTrack> for Room {
    type Result = ();
    fn handle(&mut self, msg: PublishTrack, _ctx: &mut Self::Context) {
        let Some(m) = self.members.get_mut(&msg.sid) else {
            // The publisher left meanwhile: make sure the engine forgets the track.
            let _ = self.media.send(Command::UnbindTrack { track: msg.key });
            return;
        };
        m.info.tracks.retain(|t| t.sid != msg.track.sid);
        m.info.tracks.push(msg.track.clone());
        m.info.is_publisher = true;
        m.info.version += 1;
        let track_sid = msg.track.sid.clone();
        let addr = Track::new(
            msg.track,
            msg.sid.clone(),
            msg.key,
            self.media.clone(),
            &self.span,
        )
        .with_publisher(m.addr.clone())
        .start();
        self.tracks.insert(
            track_sid.clone(),
            TrackEntry {
                addr,
                publisher_sid: msg.sid.clone(),
            },
        );
        // The update carrying the TrackInfo goes out before any subscriber offer.
        self.broadcast_info(&msg.sid);
        let subscribers: Vec<String> = self
            .members
            .iter()
            .filter(|(sid, m)| **sid != msg.sid && m.auto_subscribe)
            .map(|(sid, _)| sid.clone())
            .collect();
        for s in subscribers {
            self.subscribe(&s, &track_sid);
        }
    }
}

impl Handler<UnpublishTrack> for Room {
    type Result = ();
    fn handle(&mut self, msg: UnpublishTrack, _ctx: &mut Self::Context) {
        let owned = self
            .tracks
            .get(&msg.track_sid)
            .is_some_and(|t| t.publisher_sid == msg.sid);
        if !owned {
            return;
        }
        self.remove_track(&msg.track_sid);
        if let Some(l) = self.levels.get_mut(&msg.sid) {
            l.remove(&msg.track_sid);
        }
        if let Some(m) = self.members.get_mut(&msg.sid) {
            m.info.tracks.retain(|t| t.sid != msg.track_sid);
        }
        self.bump(&msg.sid);
        self.broadcast_info(&msg.sid);
    }
}

impl Handler<MuteTrack> for Room {
    type Result = ();
    fn handle(&mut self, msg: MuteTrack, _ctx: &mut Self::Context) {
        let Some(m) = self.members.get_mut(&msg.sid) else {
            return;
        };
        let Some(t) = m.info.tracks.iter_mut().find(|t| t.sid == msg.track_sid) else {
            return;
        };
        if t.muted == msg.muted {
            return;
        }
        t.muted = msg.muted;
        if let Some(te) = self.tracks.get(&msg.track_sid) {
            te.addr.do_send(SetMuted(msg.muted));
        }
        self.bump(&msg.sid);
        self.broadcast_info(&msg.sid);
    }
}

impl Handler<SetState> for Room {
    type Result = ();
    fn handle(&mut self, msg: SetState, _ctx: &mut Self::Context) {
        let Some(m) = self.members.get_mut(&msg.sid) else {
            return;
        };
        if m.info.state == msg.state as i32 {
            return;
        }
        m.info.state = msg.state as i32;
        self.bump(&msg.sid);
        self.broadcast_info(&msg.sid);
    }
}

impl Handler<UpdateMetadata> for Room {
    type Result = ();
    fn handle(&mut self, msg: UpdateMetadata, _ctx: &mut Self::Context) {
        let Some(m) = self.members.get_mut(&msg.sid) else {
            return;
        };
        let u = msg.update;
        if !u.name.is_empty() {
            m.info.name = u.name;
        }
        if !u.metadata.is_empty() {
            m.info.metadata = u.metadata;
        }
        for (k, v) in u.attributes {
            if v.is_empty() {
                m.info.attributes.remove(&k);
            } else {
                m.info.attributes.insert(k, v);
            }
        }
        self.bump(&msg.sid);
        self.broadcast_info(&msg.sid);
    }
}

impl Handler<UpdateSubscription> for Room {
    type Result = ();
    fn handle(&mut self, msg: UpdateSubscription, _ctx: &mut Self::Context) {
        for t in msg.track_sids {
            if msg.subscribe {
                self.subscribe(&msg.sid, &t);
            } else {
                self.unsubscribe(&msg.sid, &t, false);
            }
        }
    }
}

impl Handler<RouteData> for Room {
    type Result = ();
    fn handle(&mut self, msg: RouteData, _ctx: &mut Self::Context) {
        for (sid, m) in &self.members {
            if *sid == msg.from_sid {
                continue;
            }
            if !msg.destinations.is_empty() && !msg.destinations.contains(&m.info.identity) {
                continue;
            }
            let cmd = Command::SendData {
                peer: m.sub_peer,
                reliable: msg.reliable,
                data: msg.data.clone(),
            };
            if self.media.send(cmd).is_err() {
                METRICS.inc_dropped_data();
            }
        }
    }
}

impl Handler<Summarize> for Room {
    type Result = MessageResult<Summarize>;
    fn handle(&mut self, _msg: Summarize, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(RoomSummary {
            info: self.room_info(),
            participants: self
                .members
                .values()
                .filter(|m| !m.hidden)
                .map(|m| m.info.clone())
                .collect(),
        })
    }
}

/// A subscriber's `UpdateTrackSettings`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct TrackSettings {
    pub sid: String,
    pub settings: lk::UpdateTrackSettings,
}

/// The speech level of one of a participant's audio tracks.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AudioLevel {
    pub sid: String,
    pub track_sid: String,
    pub level: f32,
    pub active: bool,
}

/// A participant's connection quality.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ConnQuality {
    pub sid: String,
    pub quality: lk::ConnectionQuality,
    pub score: f32,
}

impl Handler<TrackSettings> for Room {
    type Result = ();
    fn handle(&mut self, msg: TrackSettings, _ctx: &mut Self::Context) {
        let Some(m) = self.members.get(&msg.sid) else {
            return;
        };
        let st = msg.settings;
        // An explicit quality applies when no dimensions are given.
        let quality = (st.width == 0 && st.height == 0).then_some(st.quality);
        for t in &st.track_sids {
            if !m.subscriptions.contains(t) {
                continue;
            }
            if let Some(te) = self.tracks.get(t) {
                te.addr.do_send(SubscriberSettings {
                    participant_sid: msg.sid.clone(),
                    disabled: st.disabled,
                    quality,
                    width: st.width,
                    height: st.height,
                });
            }
        }
    }
}

impl Handler<AudioLevel> for Room {
    type Result = ();
    fn handle(&mut self, msg: AudioLevel, _ctx: &mut Self::Context) {
        if !self.members.contains_key(&msg.sid) {
            return;
        }
        self.levels
            .entry(msg.sid)
            .or_default()
            .insert(msg.track_sid, (msg.level, msg.active));
    }
}

impl Handler<ConnQuality> for Room {
    type Result = ();
    fn handle(&mut self, msg: ConnQuality, _ctx: &mut Self::Context) {
        if !self.members.contains_key(&msg.sid) {
            return;
        }
        self.qualities
            .insert(msg.sid, (msg.quality as i32, msg.score));
    }
}
