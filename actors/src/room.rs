//! The Room actor: the authoritative state of one room — its participants (with their
//! `ParticipantInfo` and its growing `version`), its tracks and who subscribes to what.
//!
//! Every change to a participant goes through the room, which bumps the version and broadcasts
//! a `ParticipantUpdate`. Subscriptions are decided here and carried out by [`Track`] actors.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use livekit_protocol as lk;
use lk::signal_response::Message as Resp;

use arbor_proto::relay::{self as wire, link_frame::Kind as LinkMsg};

use crate::config::{RoomPolicy, RoomSettings};
use crate::error::RoomError;
use crate::events::names as ev;
use crate::fabric::{Directory, LinkEvent, LinkIo, LinkStream};
use crate::ids::new_sid;
use crate::manager::{RoomManager, RoomStopped};
use crate::media::{Command, MediaHandle, PeerId, TrackKey};
use crate::metrics::METRICS;
use crate::participant::{Kick, Participant, SendSignal, SetPermission};
use crate::track::{
    AddSubscriber, CloseTrack, PolicyCap, RelayNeed, RemoteNeed, RemoveSubscriber, SetMuted,
    SubscriberSettings, Track,
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
    /// Room policy `audio_only_after`: this member receives no video.
    audio_only: bool,
    /// Join order, for policies.
    joined_seq: u64,
}

struct TrackEntry {
    addr: Addr<Track>,
    publisher_sid: String,
    video: bool,
    /// The last-N cap last sent to the track (3: forwarded; 0: not among the last N).
    last_n_cap: u8,
    /// The data-plane key (also the track's relay flow id on links from this node).
    key: TrackKey,
    /// Relayed tracks: the link the media comes from.
    source_link: Option<u64>,
    /// Relayed tracks: what we last asked the source link for (`None`: nothing).
    upstream_wanted: Option<u8>,
    /// Relayed tracks: the best layer this node's own viewers need (from the track actor).
    local_rank: u8,
}

/// A participant served by another node, learned over link `link`.
struct Remote {
    info: lk::ParticipantInfo,
    link: u64,
    /// The latest state of it that arrived over another live link (a second path, while the
    /// tree re-forms after a node died): where it is adopted from if `link` closes.
    alt: Option<(u64, wire::ParticipantState)>,
}

/// One room link (see [`crate::fabric`]).
struct Link {
    peer: u64,
    tx: tokio::sync::mpsc::Sender<LinkMsg>,
    /// Towards the origin.
    upstream: bool,
    /// A new upstream being brought up by a re-plan (make-before-break): it receives our
    /// participants (so the tree above learns the new path) but not yet our demand or data,
    /// until it has confirmed everything the old upstream told us (see `try_switch`).
    candidate: bool,
    /// Tracks the other side wants from us, with the best layer rank it needs.
    wants: BTreeMap<String, u8>,
}

/// A room's place in the fabric.
pub struct FabricRole {
    pub directory: Arc<dyn Directory>,
    /// The origin node (this node: the room is the origin).
    pub origin: u64,
    /// The room's cluster-wide sid and creation time, from the directory (the sid is empty if
    /// the directory had none: the room then makes up its own).
    pub sid: String,
    pub created_ms: u64,
}

/// One room. See the module documentation.
pub struct Room {
    info: lk::Room,
    settings: Arc<RoomSettings>,
    /// This room's media policies: the server's defaults, or a `CreateRoom` preset.
    policy: RoomPolicy,
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
    /// Participant sids, most recent speaker first (for last-N).
    recent_speakers: Vec<String>,
    next_join_seq: u64,
    span: tracing::Span,
    /// Server-initiated RPCs waiting for the destination's ack/response, by request id.
    rpc: HashMap<String, PendingRpc>,
    /// Server-initiated RPCs of other nodes delivered by (or passing through) this node: request
    /// id → the link their ack and response go back on. At most [`RPC_MAX_PENDING`], each kept
    /// only for its timeouts.
    rpc_relays: HashMap<String, u64>,
    /// Why members are disconnected when the room stops.
    close_reason: lk::DisconnectReason,
    /// Members announced by a `participant_joined` event (sent, as LiveKit does, when a member
    /// first becomes ACTIVE). Their track events follow; the others' leaving is
    /// `participant_connection_aborted`.
    announced: BTreeSet<String>,
    /// Clustered rooms: the directory and the origin.
    fabric: Option<FabricRole>,
    links: BTreeMap<u64, Link>,
    next_link: u64,
    remotes: BTreeMap<String, Remote>,
    /// Speaker levels of remote participants, as last reported.
    remote_levels: BTreeMap<String, (f32, bool)>,
    /// An upstream link is being opened.
    connecting: bool,
    /// The last upstream attempt failed: the next goes to the origin, not the planned parent.
    upstream_failed: bool,
    /// A re-plan is asking the planner or bringing up a candidate upstream.
    switching: bool,
}

/// A room's public summary.
#[derive(Debug, Clone)]
pub struct RoomSummary {
    pub info: lk::Room,
    pub participants: Vec<lk::ParticipantInfo>,
}

/// Apply a name / metadata / attributes update as LiveKit does: empty strings leave the field
/// alone, an attribute set to "" is deleted.
fn apply_metadata(
    info: &mut lk::ParticipantInfo,
    name: String,
    metadata: String,
    attributes: impl IntoIterator<Item = (String, String)>,
) {
    if !name.is_empty() {
        info.name = name;
    }
    if !metadata.is_empty() {
        info.metadata = metadata;
    }
    for (k, v) in attributes {
        if v.is_empty() {
            info.attributes.remove(&k);
        } else {
            info.attributes.insert(k, v);
        }
    }
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
        fabric: Option<FabricRole>,
    ) -> Self {
        // Clustered: the same sid and creation time on every node (from the directory), so
        // clients, webhooks and the server API see one room whichever node they talk to.
        let (sid, ms) = match &fabric {
            Some(f) if !f.sid.is_empty() => (
                f.sid.clone(),
                i64::try_from(f.created_ms).unwrap_or_else(|_| now_ms()),
            ),
            _ => (new_sid("RM_"), now_ms()),
        };
        let info = lk::Room {
            sid,
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
            policy: RoomPolicy {
                last_n: settings.last_n,
                audio_only_after: settings.audio_only_after,
            },
            settings,
            media,
            manager,
            members: BTreeMap::new(),
            tracks: BTreeMap::new(),
            close_timer: None,
            levels: BTreeMap::new(),
            sent_speakers: BTreeMap::new(),
            qualities: BTreeMap::new(),
            recent_speakers: Vec::new(),
            next_join_seq: 0,
            span,
            rpc: HashMap::new(),
            rpc_relays: HashMap::new(),
            close_reason: lk::DisconnectReason::RoomClosed,
            announced: BTreeSet::new(),
            fabric,
            links: BTreeMap::new(),
            next_link: 1,
            remotes: BTreeMap::new(),
            remote_levels: BTreeMap::new(),
            connecting: false,
            upstream_failed: false,
            switching: false,
        }
    }

    fn room_info(&self) -> lk::Room {
        let mut r = self.info.clone();
        r.num_participants =
            (self.members.values().filter(|m| !m.hidden).count() + self.remotes.len()) as u32;
        r.num_publishers = (self
            .members
            .values()
            .filter(|m| !m.hidden && m.info.is_publisher)
            .count()
            + self
                .remotes
                .values()
                .filter(|r| r.info.is_publisher)
                .count()) as u32;
        r
    }

    /// Send the member's current info to everyone (hidden members are never announced, but
    /// always hear about themselves).
    fn broadcast_info(&mut self, sid: &str) {
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
        if !m.hidden {
            let msg = LinkMsg::Participant(self.link_state(&m.info));
            self.flood(None, msg);
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
                cap: if m.audio_only && t.video { 0 } else { 3 },
            });
        }
        self.update_demand(track_sid);
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
        self.update_demand(track_sid);
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
        for (sid, l) in &self.remote_levels {
            if self.remotes.contains_key(sid) {
                current.insert(sid.clone(), *l);
            }
        }
        for (sid, (_, active)) in &current {
            if *active {
                self.recent_speakers.retain(|s| s != sid);
                self.recent_speakers.insert(0, sid.clone());
            }
        }
        self.recent_speakers.truncate(64);
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

    /// Room policy last-N: only the video of the N most recent speakers is forwarded (with
    /// fewer speakers, the earliest joiners fill the remaining places). Off when N is 0; a
    /// room whose policy was just switched off releases the caps it had set.
    fn apply_last_n(&mut self) {
        let n = self.policy.last_n;
        if n == 0 {
            for t in self.tracks.values_mut() {
                if t.video && t.last_n_cap != 3 {
                    t.last_n_cap = 3;
                    t.addr.do_send(PolicyCap {
                        participant_sid: None,
                        cap: 3,
                    });
                }
            }
            return;
        }
        let mut order: Vec<String> = self
            .recent_speakers
            .iter()
            .filter(|s| self.members.contains_key(*s))
            .cloned()
            .collect();
        let mut by_join: Vec<(&u64, &String)> = self
            .members
            .iter()
            .map(|(sid, m)| (&m.joined_seq, sid))
            .collect();
        by_join.sort();
        for (_, sid) in by_join {
            if !order.contains(sid) {
                order.push(sid.clone());
            }
        }
        order.truncate(n);
        for t in self.tracks.values_mut() {
            if !t.video {
                continue;
            }
            let cap = if order.contains(&t.publisher_sid) {
                3
            } else {
                0
            };
            if cap != t.last_n_cap {
                t.last_n_cap = cap;
                t.addr.do_send(PolicyCap {
                    participant_sid: None,
                    cap,
                });
            }
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
            if room.members.is_empty() && room.links.values().all(|l| l.upstream) {
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
        // Clustered: `room_started` and `room_finished` come from the room's origin only, so a
        // webhook receiver sees one room however many nodes serve it (participant and track
        // events come from the node the participant is on, so they are once per cluster too).
        if !self.is_edge() {
            self.settings
                .events
                .emit(ev::ROOM_STARTED, &self.room_info(), None, None);
        }
        self.schedule_close(ctx, self.settings.empty_timeout);
        ctx.run_interval(SPEAKER_INTERVAL, |room, _| {
            room.send_speakers();
            room.apply_last_n();
            room.send_levels();
        });
        if self.is_edge() {
            self.connect_upstream(ctx);
        }
        if self.fabric.is_some() {
            ctx.run_interval(REPLAN_EVERY, |room, ctx| room.replan(ctx));
        }
        ctx.run_interval(QUALITY_INTERVAL, |room, _| room.send_qualities());
    }

    fn stopped(&mut self, ctx: &mut Self::Context) {
        METRICS
            .rooms
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        self.emit_room_closing();
        for (_, t) in std::mem::take(&mut self.tracks) {
            t.addr.do_send(CloseTrack);
        }
        for m in self.members.values() {
            m.addr.do_send(Kick {
                reason: self.close_reason,
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
            <Self as Handler<Leave>>::handle(
                self,
                Leave {
                    sid,
                    reason: lk::DisconnectReason::DuplicateIdentity,
                },
                ctx,
            );
        }
        // The identity came back here: what a dead upstream left of it is gone.
        self.drop_orphans_named(&msg.info.identity, &msg.info.sid);
        let max = self.info.max_participants;
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
            .chain(self.remotes.values().map(|r| r.info.clone()))
            .collect();
        tracing::info!(parent: &self.span, participant = %sid, identity = %msg.info.identity, "participant joined");
        let after = self.policy.audio_only_after;
        let audio_only = after > 0 && self.members.len() >= after;
        let joined_seq = self.next_join_seq;
        self.next_join_seq += 1;
        self.members.insert(
            sid.clone(),
            Member {
                info: msg.info,
                addr: msg.addr,
                sub_peer: msg.sub_peer,
                auto_subscribe: msg.auto_subscribe,
                hidden: msg.hidden,
                subscriptions: BTreeSet::new(),
                audio_only,
                joined_seq,
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
                let msg = LinkMsg::Participant(self.link_state(&m.info));
                self.flood(None, msg);
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
            self.update_demand(&t);
        }
        let published: Vec<String> = self
            .tracks
            .iter()
            .filter(|(_, t)| t.publisher_sid == msg.sid)
            .map(|(sid, _)| sid.clone())
            .collect();
        let announced = self.announced.remove(&msg.sid);
        for t in published {
            if announced {
                if let Some(info) = m.info.tracks.iter().find(|i| i.sid == t) {
                    self.settings.events.emit(
                        ev::TRACK_UNPUBLISHED,
                        &self.room_info(),
                        Some(&m.info),
                        Some(info),
                    );
                }
            }
            self.remove_track(&t);
        }
        if !m.hidden {
            m.info.state = lk::participant_info::State::Disconnected as i32;
            m.info.disconnect_reason = msg.reason as i32;
            let event = if announced {
                ev::PARTICIPANT_LEFT
            } else {
                ev::PARTICIPANT_CONNECTION_ABORTED
            };
            self.settings
                .events
                .emit(event, &self.room_info(), Some(&m.info), None);
            m.info.version += 1;
            m.info.tracks.clear();
            self.flood(
                None,
                LinkMsg::Gone(wire::ParticipantGone {
                    info: Some(m.info.clone()),
                }),
            );
            let update = Resp::Update(lk::ParticipantUpdate {
                participants: vec![m.info],
            });
            for other in self.members.values() {
                other.addr.do_send(SendSignal(update.clone()));
            }
        }
        if self.members.is_empty() {
            let after = std::time::Duration::from_secs(self.info.departure_timeout.into());
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
        let is_video = msg.track.r#type == lk::TrackType::Video as i32;
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
                video: is_video,
                last_n_cap: 3,
                key: msg.key,
                source_link: None,
                upstream_wanted: None,
                local_rank: 3,
            },
        );
        let announced = self.announced.contains(&msg.sid);
        if let Some(m) = self.members.get(&msg.sid).filter(|_| announced) {
            if let Some(t) = m.info.tracks.iter().find(|t| t.sid == track_sid) {
                self.settings.events.emit(
                    ev::TRACK_PUBLISHED,
                    &self.room_info(),
                    Some(&m.info),
                    Some(t),
                );
            }
        }
        self.apply_last_n();
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
        let announced = self.announced.contains(&msg.sid);
        if let Some(m) = self.members.get(&msg.sid).filter(|_| announced) {
            if let Some(t) = m.info.tracks.iter().find(|t| t.sid == msg.track_sid) {
                self.settings.events.emit(
                    ev::TRACK_UNPUBLISHED,
                    &self.room_info(),
                    Some(&m.info),
                    Some(t),
                );
            }
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
        if msg.state == lk::participant_info::State::Active {
            self.announce(&msg.sid);
        }
    }
}

impl Handler<UpdateMetadata> for Room {
    type Result = ();
    fn handle(&mut self, msg: UpdateMetadata, _ctx: &mut Self::Context) {
        let Some(m) = self.members.get_mut(&msg.sid) else {
            return;
        };
        let u = msg.update;
        apply_metadata(&mut m.info, u.name, u.metadata, u.attributes);
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
        // Answers to server-initiated RPCs are addressed to the request id, not to a member.
        if let [dest] = msg.destinations.as_slice() {
            if self.rpc.contains_key(dest) {
                let dest = dest.clone();
                self.rpc_answer(&dest, &msg.from_sid, &msg.data);
                return;
            }
            if let Some(&back) = self.rpc_relays.get(dest) {
                // An answer to another node's call: back the way the call came.
                let request_id = dest.clone();
                self.send_to(
                    back,
                    LinkMsg::RpcReply(wire::RpcReply {
                        request_id,
                        from_sid: msg.from_sid,
                        data: msg.data,
                    }),
                );
                return;
            }
        }
        self.deliver_data(&msg.from_sid, msg.reliable, &msg.destinations, &msg.data);
        if self.members.contains_key(&msg.from_sid) {
            self.flood(
                None,
                LinkMsg::Data(wire::DataMessage {
                    from_sid: msg.from_sid,
                    reliable: msg.reliable,
                    destinations: msg.destinations,
                    data: msg.data,
                }),
            );
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
                .chain(self.remotes.values().map(|r| r.info.clone()))
                .collect(),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Server API (Twirp RoomService) and lifecycle events
// ---------------------------------------------------------------------------------------------

/// How long the destination of a server-initiated RPC has to acknowledge it (LiveKit clients
/// ack on receipt, before running the handler).
pub const RPC_ACK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Response timeout when the request names none (`PerformRpcRequest.response_timeout_ms` = 0).
pub const RPC_DEFAULT_RESPONSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Upper bound of any RPC response timeout.
pub const RPC_MAX_RESPONSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// Largest RPC payload, as LiveKit clients enforce (15 KiB).
pub const RPC_MAX_PAYLOAD_BYTES: usize = 15 * 1024;
/// Server-initiated RPCs one room keeps in flight; more are refused.
pub const RPC_MAX_PENDING: usize = 1024;

/// Why a server-initiated RPC failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RpcFailure {
    /// The destination answered with an error (`RpcError{code, message, data}`).
    Error {
        code: u32,
        message: String,
        data: String,
    },
    /// No ack within [`RPC_ACK_TIMEOUT`]: the destination is unreachable.
    ConnectionTimeout,
    /// Acked, but no response within the response timeout.
    ResponseTimeout,
}

struct PendingRpc {
    destination: String,
    acked: bool,
    reply: tokio::sync::oneshot::Sender<Result<String, RpcFailure>>,
}

impl Room {
    /// Events for a room that stops: its tracks, then its members, then the room.
    fn emit_room_closing(&self) {
        let events = &self.settings.events;
        if !events.enabled() {
            return;
        }
        let room = self.room_info();
        for (sid, m) in self.members.iter().filter(|(_, m)| !m.hidden) {
            let announced = self.announced.contains(sid);
            if announced {
                for t in &m.info.tracks {
                    events.emit(ev::TRACK_UNPUBLISHED, &room, Some(&m.info), Some(t));
                }
            }
            let mut info = m.info.clone();
            info.state = lk::participant_info::State::Disconnected as i32;
            info.disconnect_reason = self.close_reason as i32;
            let event = if announced {
                ev::PARTICIPANT_LEFT
            } else {
                ev::PARTICIPANT_CONNECTION_ABORTED
            };
            events.emit(event, &room, Some(&info), None);
        }
        if !self.is_edge() {
            events.emit(ev::ROOM_FINISHED, &room, None, None);
        }
    }

    /// Send `participant_joined` for a member that became active (once), then
    /// `track_published` for the tracks it already has, so receivers always see a participant
    /// before its tracks.
    fn announce(&mut self, sid: &str) {
        let Some(m) = self.members.get(sid) else {
            return;
        };
        if m.hidden || !self.announced.insert(sid.to_string()) {
            return;
        }
        let room = self.room_info();
        self.settings
            .events
            .emit(ev::PARTICIPANT_JOINED, &room, Some(&m.info), None);
        for t in &m.info.tracks {
            self.settings
                .events
                .emit(ev::TRACK_PUBLISHED, &room, Some(&m.info), Some(t));
        }
    }

    /// Applies an `UpdateParticipant` to local member `sid` (from the server API on this node or
    /// forwarded over a link), tells its client a new permission and everyone the new info.
    fn update_member(
        &mut self,
        sid: &str,
        name: String,
        metadata: String,
        attributes: HashMap<String, String>,
        permission: Option<lk::ParticipantPermission>,
    ) {
        let Some(m) = self.members.get_mut(sid) else {
            return;
        };
        apply_metadata(&mut m.info, name, metadata, attributes);
        let mut drop_subscriptions = false;
        if let Some(p) = permission {
            drop_subscriptions = !p.can_subscribe;
            m.info.permission = Some(p.clone());
            m.addr.do_send(SetPermission(p));
        }
        if drop_subscriptions {
            let subs: Vec<String> = m.subscriptions.iter().cloned().collect();
            for t in subs {
                self.unsubscribe(sid, &t, false);
            }
        }
        self.bump(sid);
        self.broadcast_info(sid);
    }

    fn sid_of(&self, identity: &str) -> Result<String, RoomError> {
        self.members
            .iter()
            .find(|(_, m)| m.info.identity == identity)
            .map(|(sid, _)| sid.clone())
            .ok_or_else(|| RoomError::ParticipantNotFound(identity.to_string()))
    }

    fn broadcast_room(&self) {
        let update = Resp::RoomUpdate(lk::RoomUpdate {
            room: Some(self.room_info()),
        });
        for m in self.members.values() {
            m.addr.do_send(SendSignal(update.clone()));
        }
    }

    /// An ack or response to a server-initiated RPC, sent by member `from_sid`.
    fn rpc_answer(&mut self, request_id: &str, from_sid: &str, data: &[u8]) {
        use prost::Message as _;
        // The destination may be served here or (a relayed call) by another node.
        let from_identity = self
            .members
            .get(from_sid)
            .map(|m| m.info.identity.as_str())
            .or_else(|| self.remotes.get(from_sid).map(|r| r.info.identity.as_str()));
        let Some(p) = self.rpc.get_mut(request_id) else {
            return;
        };
        if from_identity != Some(p.destination.as_str()) {
            METRICS.inc_dropped_data();
            return;
        }
        let Ok(pkt) = lk::DataPacket::decode(data) else {
            METRICS.inc_dropped_data();
            return;
        };
        match pkt.value {
            Some(lk::data_packet::Value::RpcAck(a)) if a.request_id == request_id => {
                p.acked = true;
            }
            Some(lk::data_packet::Value::RpcResponse(r)) if r.request_id == request_id => {
                let Some(p) = self.rpc.remove(request_id) else {
                    return;
                };
                let result = match r.value {
                    Some(lk::rpc_response::Value::Payload(s)) => Ok(s),
                    Some(lk::rpc_response::Value::Error(e)) => Err(RpcFailure::Error {
                        code: e.code,
                        message: e.message,
                        data: e.data,
                    }),
                    // Only sent to requests of version >= 2; ours are version 1.
                    Some(lk::rpc_response::Value::CompressedPayload(_)) => Err(RpcFailure::Error {
                        code: 1400,
                        message: "compressed RPC payloads are not supported".into(),
                        data: String::new(),
                    }),
                    None => Ok(String::new()),
                };
                let _ = p.reply.send(result);
            }
            _ => METRICS.inc_dropped_data(),
        }
    }
}

/// Apply `CreateRoom` options (non-zero fields). Replies with the room.
#[derive(Message)]
#[rtype(result = "lk::Room")]
pub struct Configure {
    pub empty_timeout: u32,
    pub departure_timeout: u32,
    pub max_participants: u32,
    pub metadata: String,
    /// The policies of the `room_preset` the room was created with (already resolved
    /// against `room.presets` by the caller). Last-N applies from the next speaker round;
    /// audio-only applies to participants who join from now on.
    pub policy: Option<RoomPolicy>,
}

impl Handler<Configure> for Room {
    type Result = MessageResult<Configure>;
    fn handle(&mut self, msg: Configure, ctx: &mut Self::Context) -> Self::Result {
        if msg.empty_timeout > 0 {
            self.info.empty_timeout = msg.empty_timeout;
            if self.members.is_empty() {
                let after = std::time::Duration::from_secs(msg.empty_timeout.into());
                self.schedule_close(ctx, after);
            }
        }
        if msg.departure_timeout > 0 {
            self.info.departure_timeout = msg.departure_timeout;
        }
        if msg.max_participants > 0 {
            self.info.max_participants = msg.max_participants;
        }
        if let Some(p) = msg.policy {
            tracing::info!(parent: &self.span, last_n = p.last_n, audio_only_after = p.audio_only_after, "room policies from the CreateRoom preset");
            self.policy = p;
            self.apply_last_n();
        }
        if !msg.metadata.is_empty() && msg.metadata != self.info.metadata {
            self.info.metadata = msg.metadata;
            self.broadcast_room();
        }
        MessageResult(self.room_info())
    }
}

/// Close the room now (`DeleteRoom`): everyone is disconnected with `ROOM_DELETED`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CloseRoom;

impl Handler<CloseRoom> for Room {
    type Result = ();
    fn handle(&mut self, _msg: CloseRoom, ctx: &mut Self::Context) {
        tracing::info!(parent: &self.span, "room deleted by the server API");
        self.close_reason = lk::DisconnectReason::RoomDeleted;
        ctx.stop();
    }
}

/// Disconnect one participant (`RemoveParticipant`).
#[derive(Message)]
#[rtype(result = "Result<(), RoomError>")]
pub struct RemoveParticipant {
    pub identity: String,
}

impl Handler<RemoveParticipant> for Room {
    type Result = Result<(), RoomError>;
    fn handle(&mut self, msg: RemoveParticipant, ctx: &mut Self::Context) -> Self::Result {
        let reason = lk::DisconnectReason::ParticipantRemoved;
        let sid = match self.sid_of(&msg.identity) {
            Ok(sid) => sid,
            Err(e) => {
                // Served by another node: ask it, over the link the participant is known by.
                let Some((sid, link)) = self.remote_link(&msg.identity) else {
                    return Err(e);
                };
                let frame = LinkMsg::Remove(wire::RemoveParticipant {
                    sid,
                    reason: reason as i32,
                });
                self.send_to(link, frame);
                return Ok(());
            }
        };
        if let Some(m) = self.members.get(&sid) {
            m.addr.do_send(Kick { reason });
        }
        <Self as Handler<Leave>>::handle(self, Leave { sid, reason }, ctx);
        Ok(())
    }
}

/// Mute or unmute a participant's published track (`MutePublishedTrack`). The publisher is told
/// with a `mute` signal message; everyone sees the new `TrackInfo.muted`.
#[derive(Message)]
#[rtype(result = "Result<lk::TrackInfo, RoomError>")]
pub struct AdminMuteTrack {
    pub identity: String,
    pub track_sid: String,
    pub muted: bool,
}

impl Handler<AdminMuteTrack> for Room {
    type Result = Result<lk::TrackInfo, RoomError>;
    fn handle(&mut self, msg: AdminMuteTrack, ctx: &mut Self::Context) -> Self::Result {
        if !msg.muted && !self.settings.enable_remote_unmute {
            return Err(RoomError::NotAllowed(
                "remote unmute is disabled (room.enable_remote_unmute)".into(),
            ));
        }
        let sid = match self.sid_of(&msg.identity) {
            Ok(sid) => sid,
            Err(e) => {
                // Served by another node: forward, and answer with the state it will have.
                let Some((sid, link, track)) =
                    self.remote_by_identity(&msg.identity).map(|(sid, r)| {
                        let t = r
                            .info
                            .tracks
                            .iter()
                            .find(|t| t.sid == msg.track_sid)
                            .cloned();
                        (sid.clone(), r.link, t)
                    })
                else {
                    return Err(e);
                };
                let Some(mut track) = track else {
                    return Err(RoomError::TrackNotFound(msg.track_sid));
                };
                self.send_to(
                    link,
                    LinkMsg::Mute(wire::MuteTrack {
                        sid,
                        track_sid: msg.track_sid,
                        muted: msg.muted,
                    }),
                );
                track.muted = msg.muted;
                return Ok(track);
            }
        };
        let addr = {
            let m = &self.members[&sid];
            if !m.info.tracks.iter().any(|t| t.sid == msg.track_sid) {
                return Err(RoomError::TrackNotFound(msg.track_sid));
            }
            m.addr.clone()
        };
        addr.do_send(SendSignal(Resp::Mute(lk::MuteTrackRequest {
            sid: msg.track_sid.clone(),
            muted: msg.muted,
        })));
        <Self as Handler<MuteTrack>>::handle(
            self,
            MuteTrack {
                sid: sid.clone(),
                track_sid: msg.track_sid.clone(),
                muted: msg.muted,
            },
            ctx,
        );
        self.members[&sid]
            .info
            .tracks
            .iter()
            .find(|t| t.sid == msg.track_sid)
            .cloned()
            .ok_or(RoomError::TrackNotFound(msg.track_sid))
    }
}

/// Change a participant's name, metadata, attributes and/or permission (`UpdateParticipant`).
/// A permission change takes effect at once (revoking `canPublish` unpublishes its tracks,
/// revoking `canSubscribe` ends its subscriptions).
#[derive(Message)]
#[rtype(result = "Result<lk::ParticipantInfo, RoomError>")]
pub struct AdminUpdateParticipant {
    pub identity: String,
    pub name: String,
    pub metadata: String,
    /// Attributes to set; an empty value deletes the key.
    pub attributes: HashMap<String, String>,
    pub permission: Option<lk::ParticipantPermission>,
}

impl Handler<AdminUpdateParticipant> for Room {
    type Result = Result<lk::ParticipantInfo, RoomError>;
    fn handle(&mut self, msg: AdminUpdateParticipant, _ctx: &mut Self::Context) -> Self::Result {
        let size = update_size(&msg.name, &msg.metadata, &msg.attributes);
        if size > self.settings.max_metadata_bytes {
            return Err(RoomError::LimitExceeded(format!(
                "metadata too large ({size} bytes; limit.max_metadata_bytes = {})",
                self.settings.max_metadata_bytes
            )));
        }
        let sid = match self.sid_of(&msg.identity) {
            Ok(sid) => sid,
            Err(e) => {
                // Served by another node: forward, and answer with the info it will have.
                let Some((sid, link, mut info)) = self
                    .remote_by_identity(&msg.identity)
                    .map(|(sid, r)| (sid.clone(), r.link, r.info.clone()))
                else {
                    return Err(e);
                };
                apply_metadata(
                    &mut info,
                    msg.name.clone(),
                    msg.metadata.clone(),
                    msg.attributes.clone(),
                );
                if let Some(p) = &msg.permission {
                    info.permission = Some(p.clone());
                }
                self.send_to(
                    link,
                    LinkMsg::Update(wire::UpdateParticipant {
                        sid,
                        name: msg.name,
                        metadata: msg.metadata,
                        attributes: msg.attributes,
                        permission: msg.permission,
                    }),
                );
                return Ok(info);
            }
        };
        self.update_member(&sid, msg.name, msg.metadata, msg.attributes, msg.permission);
        Ok(self.members[&sid].info.clone())
    }
}

/// Bytes an `UpdateParticipant` adds (checked against `limit.max_metadata_bytes`).
fn update_size(name: &str, metadata: &str, attributes: &HashMap<String, String>) -> usize {
    name.len()
        + metadata.len()
        + attributes
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
}

/// Subscribe or unsubscribe a participant to tracks (`UpdateSubscriptions`).
#[derive(Message)]
#[rtype(result = "Result<(), RoomError>")]
pub struct AdminUpdateSubscriptions {
    pub identity: String,
    pub track_sids: Vec<String>,
    pub subscribe: bool,
}

impl Handler<AdminUpdateSubscriptions> for Room {
    type Result = Result<(), RoomError>;
    fn handle(&mut self, msg: AdminUpdateSubscriptions, ctx: &mut Self::Context) -> Self::Result {
        let sid = match self.sid_of(&msg.identity) {
            Ok(sid) => sid,
            Err(e) => {
                // Served by another node: its node subscribes it.
                let Some((sid, link)) = self.remote_link(&msg.identity) else {
                    return Err(e);
                };
                self.send_to(
                    link,
                    LinkMsg::Subscribe(wire::UpdateSubscriptions {
                        sid,
                        track_sids: msg.track_sids,
                        subscribe: msg.subscribe,
                    }),
                );
                return Ok(());
            }
        };
        <Self as Handler<UpdateSubscription>>::handle(
            self,
            UpdateSubscription {
                sid,
                track_sids: msg.track_sids,
                subscribe: msg.subscribe,
            },
            ctx,
        );
        Ok(())
    }
}

/// Send a data packet from the server (`SendData`) to the named identities (or everyone).
#[derive(Message)]
#[rtype(result = "Result<(), RoomError>")]
pub struct ServerData {
    pub reliable: bool,
    pub destinations: Vec<String>,
    /// The encoded `DataPacket` (no sender identity: it comes from the server).
    pub data: Vec<u8>,
}

impl Handler<ServerData> for Room {
    type Result = Result<(), RoomError>;
    fn handle(&mut self, msg: ServerData, _ctx: &mut Self::Context) -> Self::Result {
        if msg.data.len() > self.settings.max_data_packet_bytes {
            return Err(RoomError::LimitExceeded(format!(
                "data packet too large ({} bytes; limit.max_data_packet_bytes = {})",
                msg.data.len(),
                self.settings.max_data_packet_bytes
            )));
        }
        // No member has the empty sid: every (addressed) member gets it.
        self.deliver_data("", msg.reliable, &msg.destinations, &msg.data);
        // Every other node of the room delivers it to its own members (in order per link).
        self.flood(
            None,
            LinkMsg::ServerData(wire::ServerData {
                reliable: msg.reliable,
                destinations: msg.destinations,
                data: msg.data,
            }),
        );
        Ok(())
    }
}

/// Replace the room's metadata (`UpdateRoomMetadata`); every participant gets a `room_update`.
#[derive(Message)]
#[rtype(result = "Result<lk::Room, RoomError>")]
pub struct SetRoomMetadata(pub String);

impl Handler<SetRoomMetadata> for Room {
    type Result = Result<lk::Room, RoomError>;
    fn handle(&mut self, msg: SetRoomMetadata, _ctx: &mut Self::Context) -> Self::Result {
        if msg.0.len() > self.settings.max_metadata_bytes {
            return Err(RoomError::LimitExceeded(format!(
                "metadata too large ({} bytes; limit.max_metadata_bytes = {})",
                msg.0.len(),
                self.settings.max_metadata_bytes
            )));
        }
        self.info.metadata = msg.0;
        self.broadcast_room();
        self.flood(
            None,
            LinkMsg::RoomMetadata(wire::RoomMetadata {
                metadata: self.info.metadata.clone(),
            }),
        );
        Ok(self.room_info())
    }
}

/// Call an RPC method on a participant (`PerformRpc`). The room sends it an `RpcRequest` data
/// packet whose sender identity is the request id; the client's `RpcAck` and `RpcResponse` come
/// back addressed to that id and are matched in [`RouteData`]. The reply resolves exactly once:
/// with the response, or a timeout (both bounded).
#[derive(Message)]
#[rtype(result = "Result<tokio::sync::oneshot::Receiver<Result<String, RpcFailure>>, RoomError>")]
pub struct PerformRpc {
    pub identity: String,
    pub method: String,
    pub payload: String,
    pub response_timeout: std::time::Duration,
}

impl Handler<PerformRpc> for Room {
    type Result = Result<tokio::sync::oneshot::Receiver<Result<String, RpcFailure>>, RoomError>;
    fn handle(&mut self, msg: PerformRpc, ctx: &mut Self::Context) -> Self::Result {
        if msg.payload.len() > RPC_MAX_PAYLOAD_BYTES {
            return Err(RoomError::LimitExceeded(format!(
                "RPC payload too large ({} bytes; at most {RPC_MAX_PAYLOAD_BYTES})",
                msg.payload.len()
            )));
        }
        if msg.method.is_empty() {
            return Err(RoomError::InvalidArgument("RPC method is empty".into()));
        }
        if self.rpc.len() >= RPC_MAX_PENDING {
            return Err(RoomError::LimitExceeded(format!(
                "too many RPCs in flight in this room (at most {RPC_MAX_PENDING})"
            )));
        }
        let timeout = if msg.response_timeout.is_zero() {
            RPC_DEFAULT_RESPONSE_TIMEOUT
        } else {
            msg.response_timeout.min(RPC_MAX_RESPONSE_TIMEOUT)
        };
        let timeout_ms = timeout.as_millis() as u32;
        let id = new_sid("RPC_");
        match self.sid_of(&msg.identity) {
            Ok(sid) => {
                let peer = self.members[&sid].sub_peer;
                let data =
                    rpc_request_packet(&id, &msg.identity, msg.method, msg.payload, timeout_ms);
                self.media
                    .send(Command::SendData {
                        peer,
                        reliable: true,
                        data,
                    })
                    .map_err(RoomError::Media)?;
            }
            Err(e) => {
                // Served by another node: the call travels there, its answers come back as
                // `RpcReply` frames; the timeouts stay here.
                let Some((sid, link)) = self.remote_link(&msg.identity) else {
                    return Err(e);
                };
                self.send_to(
                    link,
                    LinkMsg::Rpc(wire::RpcCall {
                        sid,
                        request_id: id.clone(),
                        method: msg.method,
                        payload: msg.payload,
                        response_timeout_ms: timeout_ms,
                    }),
                );
            }
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.rpc.insert(
            id.clone(),
            PendingRpc {
                destination: msg.identity,
                acked: false,
                reply: tx,
            },
        );
        let ack_id = id.clone();
        ctx.run_later(RPC_ACK_TIMEOUT, move |room, _| {
            if room.rpc.get(&ack_id).is_some_and(|p| !p.acked) {
                if let Some(p) = room.rpc.remove(&ack_id) {
                    let _ = p.reply.send(Err(RpcFailure::ConnectionTimeout));
                }
            }
        });
        ctx.run_later(timeout, move |room, _| {
            if let Some(p) = room.rpc.remove(&id) {
                let _ = p.reply.send(Err(RpcFailure::ResponseTimeout));
            }
        });
        Ok(rx)
    }
}

/// The `RpcRequest` data packet of a server-initiated RPC: its sender identity is the request
/// id, so the client addresses its ack and response to it.
fn rpc_request_packet(
    id: &str,
    identity: &str,
    method: String,
    payload: String,
    response_timeout_ms: u32,
) -> Vec<u8> {
    use prost::Message as _;
    #[allow(deprecated)]
    let pkt = lk::DataPacket {
        kind: lk::data_packet::Kind::Reliable as i32,
        participant_identity: id.to_string(),
        destination_identities: vec![identity.to_string()],
        value: Some(lk::data_packet::Value::RpcRequest(lk::RpcRequest {
            id: id.to_string(),
            method,
            payload,
            response_timeout_ms,
            version: 1,
            ..Default::default()
        })),
        ..Default::default()
    };
    pkt.encode_to_vec()
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
                    fps: st.fps,
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

// ---------------------------------------------------------------------------------------------
// Relay fabric: room links (see `crate::fabric`)
// ---------------------------------------------------------------------------------------------

/// How long an edge waits before retrying a failed upstream link.
const LINK_RETRY: std::time::Duration = std::time::Duration::from_millis(500);
/// Re-parenting: how long after a new upstream link comes up the participants that were
/// learned over the old (dead) one and that the new parent has not confirmed are declared
/// gone. The new parent sends its full state the moment the link is up, so this only has to
/// cover one round trip and a busy actor; waiting longer only delays the departure of the
/// participants that really died with the old parent.
const ORPHAN_SETTLE: std::time::Duration = std::time::Duration::from_secs(2);
/// Re-parenting: the longest the participants and relayed tracks of a dead upstream link are
/// kept while no new upstream is up (the room's origin itself may be moving, which takes a
/// lease period).
const RELINK_GRACE: std::time::Duration = std::time::Duration::from_secs(8);
/// How often an edge asks the planner again whether its parent is still the right one (a
/// node joined, or came back): a different answer starts a make-before-break switch.
const REPLAN_EVERY: std::time::Duration = std::time::Duration::from_secs(3);
/// How often a switch checks whether the candidate upstream has confirmed everything.
const SWITCH_POLL: std::time::Duration = std::time::Duration::from_millis(100);
/// A candidate upstream that has not confirmed the room within this is dropped (the old
/// upstream stays; the next re-plan tries again).
const SWITCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(6);
/// A link id never used: a remote moved off a link it is no longer trusted on.
const NO_LINK: u64 = u64::MAX;

/// A peer node opened a room link to this (origin or parent) room.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AttachLink {
    pub peer: u64,
    pub io: LinkIo,
}

impl Handler<AttachLink> for Room {
    type Result = ();
    fn handle(&mut self, msg: AttachLink, ctx: &mut Self::Context) {
        self.attach_link(msg.peer, msg.io, false, false, ctx);
    }
}

impl StreamHandler<LinkEvent> for Room {
    fn handle(&mut self, ev: LinkEvent, ctx: &mut Self::Context) {
        match ev {
            LinkEvent::Frame(id, m) => self.on_link_frame(id, *m, ctx),
            LinkEvent::Closed(id) => self.on_link_closed(id, ctx),
        }
    }

    fn finished(&mut self, _ctx: &mut Self::Context) {
        // One link ended; `Closed` already handled it.
    }
}

impl Room {
    fn is_edge(&self) -> bool {
        self.fabric
            .as_ref()
            .is_some_and(|f| f.origin != f.directory.node_id())
    }

    /// The state of a participant as sent on links: its info plus this node's flow ids.
    fn link_state(&self, info: &lk::ParticipantInfo) -> wire::ParticipantState {
        wire::ParticipantState {
            info: Some(info.clone()),
            flows: info
                .tracks
                .iter()
                .filter_map(|t| {
                    self.tracks.get(&t.sid).map(|te| wire::TrackFlow {
                        track_sid: t.sid.clone(),
                        flow: te.key.0,
                    })
                })
                .collect(),
        }
    }

    /// Sends `msg` on every link but `except`. A link that cannot keep up is reset.
    fn flood(&mut self, except: Option<u64>, msg: LinkMsg) {
        let mut broken = Vec::new();
        let data = matches!(msg, LinkMsg::Data(_) | LinkMsg::ServerData(_));
        for (id, l) in &self.links {
            if Some(*id) == except || (data && l.candidate) {
                continue;
            }
            if l.tx.try_send(msg.clone()).is_err() {
                broken.push(*id);
            }
        }
        for id in broken {
            tracing::warn!(parent: &self.span, link = id, "room link queue full or closed; resetting it");
            // Dropping the sender closes the stream; the reader side reports `Closed`.
            if let Some(l) = self.links.get_mut(&id) {
                let (tx, _) = tokio::sync::mpsc::channel(1);
                l.tx = tx;
            }
        }
    }

    /// The remote participant (served by another node) with this identity, and its sid.
    fn remote_by_identity(&self, identity: &str) -> Option<(&String, &Remote)> {
        self.remotes
            .iter()
            .find(|(_, r)| r.info.identity == identity)
    }

    /// `(sid, link)` of the remote participant `identity` (served by another node).
    fn remote_link(&self, identity: &str) -> Option<(String, u64)> {
        self.remote_by_identity(identity)
            .map(|(sid, r)| (sid.clone(), r.link))
    }

    /// The link towards remote participant `sid`'s node for a request that arrived on link
    /// `from`: `None` if the participant is unknown or lies back the way the request came
    /// (requests are never sent back, so they cannot loop).
    fn next_hop(&self, sid: &str, from: u64) -> Option<u64> {
        self.remotes.get(sid).map(|x| x.link).filter(|l| *l != from)
    }

    fn send_to(&mut self, link: u64, msg: LinkMsg) {
        let ok = self
            .links
            .get(&link)
            .is_some_and(|l| l.tx.try_send(msg).is_ok());
        if !ok {
            if let Some(l) = self.links.get_mut(&link) {
                let (tx, _) = tokio::sync::mpsc::channel(1);
                l.tx = tx;
            }
        }
    }

    /// Delivers a data packet to local members (all but the sender, or the named identities).
    fn deliver_data(&self, from_sid: &str, reliable: bool, destinations: &[String], data: &[u8]) {
        for (sid, m) in &self.members {
            if sid == from_sid {
                continue;
            }
            if !destinations.is_empty() && !destinations.contains(&m.info.identity) {
                continue;
            }
            let cmd = Command::SendData {
                peer: m.sub_peer,
                reliable,
                data: data.to_vec(),
            };
            if self.media.send(cmd).is_err() {
                METRICS.inc_dropped_data();
            }
        }
    }

    /// Relayed track: ask (or stop asking) the source link for it when this node's demand —
    /// local subscribers or downstream links — starts or ends.
    fn update_demand(&mut self, track_sid: &str) {
        let local = self
            .members
            .values()
            .any(|m| m.subscriptions.contains(track_sid));
        let downstream = self
            .links
            .values()
            .filter_map(|l| l.wants.get(track_sid).copied())
            .max();
        let Some(t) = self.tracks.get_mut(track_sid) else {
            return;
        };
        let Some(src) = t.source_link else {
            return;
        };
        // The layers to ask for: what our viewers and the links below us need (dynacast
        // across the tree); at least the lowest layer while anyone wants the track at all.
        let want = match (local, downstream) {
            (false, None) => None,
            (l, d) => Some(
                (if l { t.local_rank } else { 0 })
                    .max(d.unwrap_or(0))
                    .clamp(1, 3),
            ),
        };
        if t.upstream_wanted == want {
            return;
        }
        t.upstream_wanted = want;
        tracing::debug!(parent: &self.span, track = %track_sid, ?want, "relay demand changed");
        self.send_to(
            src,
            LinkMsg::Want(wire::Want {
                track_sid: track_sid.to_string(),
                on: want.is_some(),
                max_rank: want.unwrap_or(0) as u32,
            }),
        );
    }

    /// Every speaker interval: the levels this node knows, to each link (minus what came from
    /// that link).
    fn send_levels(&mut self) {
        if self.links.is_empty() {
            return;
        }
        let mut local: Vec<wire::SpeakerLevel> = Vec::new();
        for (sid, tracks) in &self.levels {
            if self.members.get(sid).is_none_or(|m| m.hidden) {
                continue;
            }
            local.push(wire::SpeakerLevel {
                sid: sid.clone(),
                level: tracks.values().map(|(l, _)| *l).fold(0.0f32, f32::max),
                active: tracks.values().any(|(_, a)| *a),
            });
        }
        let ids: Vec<u64> = self.links.keys().copied().collect();
        for id in ids {
            let mut levels = local.clone();
            for (sid, (level, active)) in &self.remote_levels {
                if self.remotes.get(sid).is_some_and(|r| r.link != id) {
                    levels.push(wire::SpeakerLevel {
                        sid: sid.clone(),
                        level: *level,
                        active: *active,
                    });
                }
            }
            if !levels.is_empty() {
                self.send_to(id, LinkMsg::Levels(wire::Levels { levels }));
            }
        }
    }

    /// Edge: find the origin (it may have moved), ask the relay-tree planner for this node's
    /// parent and open the upstream link to it. After a failed attempt the next one goes
    /// straight to the origin (a planned parent that died stays in the registry until it is
    /// removed; the origin, found through the lease, is always current).
    fn connect_upstream(&mut self, ctx: &mut Context<Self>) {
        let Some(f) = &self.fabric else { return };
        if self.connecting || self.links.values().any(|l| l.upstream) {
            return;
        }
        self.connecting = true;
        let dir = f.directory.clone();
        let name = self.info.name.clone();
        let use_planner = !self.upstream_failed;
        let fut = async move {
            let origin = dir.resolve(name.clone()).await?.origin;
            if origin == dir.node_id() {
                return Ok((origin, origin, None));
            }
            let parent = if use_planner {
                match dir.parent(name.clone(), origin).await {
                    Ok(p) if p != dir.node_id() => p,
                    Ok(_) => origin,
                    Err(e) => {
                        tracing::warn!(error = %e, "relay-tree planning failed; linking to the origin");
                        origin
                    }
                }
            } else {
                origin
            };
            let io = dir.open_link(parent, name).await?;
            Ok::<_, String>((origin, parent, Some(io)))
        };
        ctx.spawn(actix::fut::wrap_future(fut).map(
            |res: Result<(u64, u64, Option<LinkIo>), String>, room: &mut Room, ctx| {
                room.connecting = false;
                match res {
                    Ok((origin, parent, io)) => {
                        room.upstream_failed = false;
                        if let Some(f) = &mut room.fabric {
                            f.origin = origin;
                        }
                        match io {
                            Some(io) => {
                                tracing::info!(parent: &room.span, origin, parent, "linked upstream");
                                if let Some(f) = &room.fabric {
                                    f.directory.upstream(&room.info.name, Some(parent));
                                }
                                room.attach_link(parent, io, true, false, ctx);
                            }
                            None => {
                                tracing::info!(parent: &room.span, "this node is now the room's origin");
                            }
                        }
                    }
                    Err(e) => {
                        room.upstream_failed = true;
                        tracing::warn!(parent: &room.span, error = %e, "cannot link upstream; retrying via the origin");
                        ctx.run_later(LINK_RETRY, |room, ctx| room.connect_upstream(ctx));
                    }
                }
            },
        ));
    }

    fn attach_link(
        &mut self,
        peer: u64,
        io: LinkIo,
        upstream: bool,
        candidate: bool,
        ctx: &mut Context<Self>,
    ) -> u64 {
        let id = self.next_link;
        self.next_link += 1;
        if let Some(h) = self.close_timer.take() {
            ctx.cancel_future(h);
        }
        tracing::info!(parent: &self.span, link = id, peer, upstream, "room link up");
        self.links.insert(
            id,
            Link {
                peer,
                tx: io.tx,
                upstream: upstream && !candidate,
                candidate,
                wants: BTreeMap::new(),
            },
        );
        ctx.add_stream(LinkStream {
            id,
            rx: io.rx,
            done: false,
        });
        // Full state: our members, and the remote ones learned elsewhere.
        let mut states: Vec<wire::ParticipantState> = self
            .members
            .values()
            .filter(|m| !m.hidden)
            .map(|m| self.link_state(&m.info))
            .collect();
        // Orphans (learned over a dead upstream, not yet confirmed) are not ours to vouch for:
        // two nodes that both kept them would otherwise confirm them to each other forever.
        // A new upstream gets only what lives below us (the rest of the room is above it).
        states.extend(
            self.remotes
                .values()
                .filter(|r| {
                    self.links
                        .get(&r.link)
                        .is_some_and(|l| !(upstream && (l.upstream || l.candidate)))
                })
                .map(|r| self.link_state(&r.info)),
        );
        for st in states {
            self.send_to(id, LinkMsg::Participant(st));
        }
        if !upstream && !self.info.metadata.is_empty() {
            let metadata = self.info.metadata.clone();
            self.send_to(id, LinkMsg::RoomMetadata(wire::RoomMetadata { metadata }));
        }
        if upstream
            && self
                .remotes
                .values()
                .any(|r| !self.links.contains_key(&r.link))
        {
            // Re-parented: the new parent's full state is on its way; whoever it does not
            // confirm by then is gone.
            ctx.run_later(ORPHAN_SETTLE, |room, _| room.sweep_orphans());
        }
        id
    }

    fn on_link_closed(&mut self, id: u64, ctx: &mut Context<Self>) {
        let Some(link) = self.links.remove(&id) else {
            return;
        };
        tracing::info!(parent: &self.span, link = id, peer = link.peer, upstream = link.upstream, "room link down");
        for t in link.wants.keys() {
            if let Some(te) = self.tracks.get(t) {
                let _ = self.media.send(Command::RelayOut {
                    track: te.key,
                    node: link.peer,
                    on: false,
                    max_rank: 0,
                });
                te.addr.do_send(RemoteNeed { link: id, rank: 0 });
            }
        }
        // What we learned over the link is not dropped at once: the node behind it may only be
        // re-parenting (its subtree re-announces itself over another link within moments), or,
        // for our upstream, our parent died and the rest of the room is still there. These
        // participants become *orphans*: one that already arrived over another live link moves
        // there now; the others wait for a link to confirm them (`on_remote_state` adopts
        // them, relayed tracks and local subscriptions intact) and are swept as gone if none
        // does (`sweep_orphans`). Nobody in the room sees a re-parenting as departures.
        let moved: Vec<(u64, wire::ParticipantState)> = self
            .remotes
            .values()
            .filter(|r| r.link == id)
            .filter_map(|r| r.alt.clone())
            .filter(|(l, _)| self.links.contains_key(l))
            .collect();
        for (l, st) in moved {
            self.on_remote_state(l, st, ctx);
        }
        for t in link.wants.keys() {
            self.update_demand(t);
        }
        if !link.upstream && self.remotes.values().any(|r| r.link == id) {
            ctx.run_later(ORPHAN_SETTLE, |room, _| room.sweep_orphans());
        }
        if link.candidate {
            self.switching = false;
        }
        if link.upstream {
            if let Some(f) = &self.fabric {
                f.directory.upstream(&self.info.name, None);
            }
            if let Some((&cid, c)) = self.links.iter_mut().find(|(_, l)| l.candidate) {
                // A switch was under way: the candidate is the upstream now.
                c.candidate = false;
                c.upstream = true;
                let peer = c.peer;
                self.switching = false;
                if let Some(f) = &self.fabric {
                    f.directory.upstream(&self.info.name, Some(peer));
                }
                self.promote(cid);
            } else {
                // Re-parent at once (the planner now leaves the dead node out). The
                // participants and relayed tracks learned upstream stay, orphaned, until the
                // new parent confirms them; then their media continues on the new link.
                self.connect_upstream(ctx);
            }
            ctx.run_later(RELINK_GRACE, |room, _| room.sweep_orphans());
        } else if self.members.is_empty() {
            let after = std::time::Duration::from_secs(self.info.departure_timeout.into());
            self.schedule_close(ctx, after);
        }
    }

    fn on_link_frame(&mut self, id: u64, msg: LinkMsg, ctx: &mut Context<Self>) {
        match msg {
            LinkMsg::Hello(_) => {}
            LinkMsg::Participant(st) => self.on_remote_state(id, st, ctx),
            LinkMsg::Gone(g) => {
                if let Some(info) = g.info {
                    // From the link it is known over, or about an orphan (any live link's
                    // word beats a dead one's).
                    let known = self
                        .remotes
                        .get(&info.sid)
                        .is_some_and(|r| r.link == id || !self.links.contains_key(&r.link));
                    let alt = self
                        .remotes
                        .get(&info.sid)
                        .filter(|r| r.link == id)
                        .and_then(|r| r.alt.clone())
                        .filter(|(l, _)| *l != id && self.links.contains_key(l));
                    if let Some((l, st)) = alt {
                        // Gone from one path but alive on another (the tree just re-formed
                        // around it): it moves there, and the sender of the Gone learns it
                        // anew from us.
                        if let Some(r) = self.remotes.get_mut(&info.sid) {
                            r.link = NO_LINK;
                        }
                        self.on_remote_state(l, st, ctx);
                    } else if known {
                        self.remove_remote(id, info);
                    }
                }
            }
            LinkMsg::Data(d) => {
                // Only over the link the sender is known by (during a switch, the same packet
                // may also come over the other path).
                if self.remotes.get(&d.from_sid).is_none_or(|r| r.link != id) {
                    METRICS.inc_dropped_data();
                    return;
                }
                self.deliver_data(&d.from_sid, d.reliable, &d.destinations, &d.data);
                self.flood(Some(id), LinkMsg::Data(d));
            }
            LinkMsg::Want(w) => {
                let Some(link) = self.links.get_mut(&id) else {
                    return;
                };
                // Unknown tracks are ignored (a stale want from before a re-link).
                let Some(te) = self.tracks.get(&w.track_sid) else {
                    return;
                };
                let rank = w.max_rank.clamp(1, 3) as u8;
                let changed = if w.on {
                    link.wants.insert(w.track_sid.clone(), rank) != Some(rank)
                } else {
                    link.wants.remove(&w.track_sid).is_some()
                };
                let peer = link.peer;
                if changed {
                    let _ = self.media.send(Command::RelayOut {
                        track: te.key,
                        node: peer,
                        on: w.on,
                        max_rank: rank,
                    });
                    te.addr.do_send(RemoteNeed {
                        link: id,
                        rank: if w.on { rank } else { 0 },
                    });
                }
                self.update_demand(&w.track_sid);
            }
            LinkMsg::Levels(l) => {
                for s in l.levels {
                    if self.remotes.get(&s.sid).is_some_and(|r| r.link == id) && s.level.is_finite()
                    {
                        self.remote_levels
                            .insert(s.sid, (s.level.clamp(0.0, 1.0), s.active));
                    }
                }
            }
            LinkMsg::Mute(m) => {
                let owns = self
                    .members
                    .get(&m.sid)
                    .filter(|x| x.info.tracks.iter().any(|t| t.sid == m.track_sid))
                    .map(|x| x.addr.clone());
                if let Some(addr) = owns {
                    addr.do_send(SendSignal(Resp::Mute(lk::MuteTrackRequest {
                        sid: m.track_sid.clone(),
                        muted: m.muted,
                    })));
                    <Self as Handler<MuteTrack>>::handle(
                        self,
                        MuteTrack {
                            sid: m.sid,
                            track_sid: m.track_sid,
                            muted: m.muted,
                        },
                        ctx,
                    );
                } else if let Some(next) = self.next_hop(&m.sid, id) {
                    self.send_to(next, LinkMsg::Mute(m));
                }
            }
            LinkMsg::Remove(r) => {
                if self.members.contains_key(&r.sid) {
                    let reason = lk::DisconnectReason::try_from(r.reason)
                        .unwrap_or(lk::DisconnectReason::ParticipantRemoved);
                    if let Some(m) = self.members.get(&r.sid) {
                        m.addr.do_send(Kick { reason });
                    }
                    <Self as Handler<Leave>>::handle(self, Leave { sid: r.sid, reason }, ctx);
                } else if let Some(next) = self.next_hop(&r.sid, id) {
                    // Towards the participant's node (never back where it came from).
                    self.send_to(next, LinkMsg::Remove(r));
                }
            }
            LinkMsg::Update(u) => {
                if self.members.contains_key(&u.sid) {
                    let size = update_size(&u.name, &u.metadata, &u.attributes);
                    if size > self.settings.max_metadata_bytes {
                        tracing::warn!(parent: &self.span, link = id, size, "forwarded participant update exceeds limit.max_metadata_bytes; dropped");
                        return;
                    }
                    self.update_member(&u.sid, u.name, u.metadata, u.attributes, u.permission);
                } else if let Some(next) = self.next_hop(&u.sid, id) {
                    self.send_to(next, LinkMsg::Update(u));
                }
            }
            LinkMsg::Subscribe(u) => {
                if self.members.contains_key(&u.sid) {
                    <Self as Handler<UpdateSubscription>>::handle(
                        self,
                        UpdateSubscription {
                            sid: u.sid,
                            track_sids: u.track_sids,
                            subscribe: u.subscribe,
                        },
                        ctx,
                    );
                } else if let Some(next) = self.next_hop(&u.sid, id) {
                    self.send_to(next, LinkMsg::Subscribe(u));
                }
            }
            LinkMsg::ServerData(d) => {
                // Not from a candidate upstream during a switch (the old path still carries
                // it; taking both would deliver it twice).
                if self.links.get(&id).is_none_or(|l| l.candidate) {
                    METRICS.inc_dropped_data();
                    return;
                }
                if d.data.len() > self.settings.max_data_packet_bytes {
                    METRICS.inc_dropped_data();
                    return;
                }
                self.deliver_data("", d.reliable, &d.destinations, &d.data);
                self.flood(Some(id), LinkMsg::ServerData(d));
            }
            LinkMsg::Rpc(c) => {
                if self.rpc_relays.len() >= RPC_MAX_PENDING
                    || c.payload.len() > RPC_MAX_PAYLOAD_BYTES
                    || self.rpc_relays.contains_key(&c.request_id)
                {
                    METRICS.inc_dropped_data();
                    return;
                }
                let timeout_ms = c
                    .response_timeout_ms
                    .min(RPC_MAX_RESPONSE_TIMEOUT.as_millis() as u32);
                let request_id = c.request_id.clone();
                if let Some(m) = self.members.get(&c.sid) {
                    let data = rpc_request_packet(
                        &c.request_id,
                        &m.info.identity,
                        c.method,
                        c.payload,
                        timeout_ms,
                    );
                    let cmd = Command::SendData {
                        peer: m.sub_peer,
                        reliable: true,
                        data,
                    };
                    if self.media.send(cmd).is_err() {
                        METRICS.inc_dropped_data();
                        return;
                    }
                } else if let Some(next) = self.next_hop(&c.sid, id) {
                    self.send_to(next, LinkMsg::Rpc(c));
                } else {
                    return;
                }
                // Remember the way back for as long as the caller may still take an answer.
                self.rpc_relays.insert(request_id.clone(), id);
                let keep = std::time::Duration::from_millis(timeout_ms.into()) + RPC_ACK_TIMEOUT;
                ctx.run_later(keep, move |room, _| {
                    room.rpc_relays.remove(&request_id);
                });
            }
            LinkMsg::RpcReply(r) => {
                if self.rpc.contains_key(&r.request_id) {
                    self.rpc_answer(&r.request_id, &r.from_sid, &r.data);
                } else if let Some(&back) = self.rpc_relays.get(&r.request_id) {
                    if back != id {
                        self.send_to(back, LinkMsg::RpcReply(r));
                    }
                }
            }
            LinkMsg::RoomMetadata(m) => {
                if m.metadata.len() <= self.settings.max_metadata_bytes
                    && m.metadata != self.info.metadata
                {
                    self.info.metadata = m.metadata.clone();
                    self.broadcast_room();
                    self.flood(Some(id), LinkMsg::RoomMetadata(m));
                }
            }
        }
    }

    /// A remote participant appeared or changed.
    fn on_remote_state(&mut self, link: u64, st: wire::ParticipantState, ctx: &mut Context<Self>) {
        let Some(info) = st.info else { return };
        let sid = info.sid.clone();
        if sid.is_empty() || self.members.contains_key(&sid) {
            return;
        }
        if let Some(r) = self.remotes.get(&sid) {
            // Known over another link: a live one is the only path to it (links form a tree),
            // a dead one makes it an orphan that this link now adopts (re-parenting).
            let adopt = r.link != link && !self.links.contains_key(&r.link);
            if !adopt && r.link != link {
                // A second path while the tree re-forms: remember it, in case the first
                // closes (then the participant moves here without a departure).
                if let Some(r) = self.remotes.get_mut(&sid) {
                    r.alt = Some((
                        link,
                        wire::ParticipantState {
                            info: Some(info),
                            flows: st.flows,
                        },
                    ));
                }
                return;
            }
            if !adopt && r.info.version > info.version {
                return;
            }
        }
        let Some(peer) = self.links.get(&link).map(|l| l.peer) else {
            return;
        };
        if !self.remotes.contains_key(&sid) {
            self.drop_orphans_named(&info.identity, &sid);
        }
        let flows: BTreeMap<&str, u64> = st
            .flows
            .iter()
            .map(|f| (f.track_sid.as_str(), f.flow))
            .collect();
        // Tracks that ended.
        let old: Vec<String> = self
            .tracks
            .iter()
            .filter(|(_, t)| t.publisher_sid == sid)
            .map(|(s, _)| s.clone())
            .collect();
        for t in &old {
            if !info
                .tracks
                .iter()
                .any(|x| &x.sid == t && flows.contains_key(x.sid.as_str()))
            {
                self.remove_track(t);
                self.remote_track_gone(t);
            }
        }
        // New tracks, mute changes, and relayed tracks whose source moved to this link.
        let mut added = Vec::new();
        let mut rebound = Vec::new();
        for t in &info.tracks {
            if let Some(te) = self.tracks.get_mut(&t.sid) {
                if let (Some(src), Some(flow)) = (te.source_link, flows.get(t.sid.as_str())) {
                    if src != link {
                        // Re-parented: same track, same local subscribers, new source.
                        let cmd = Command::RelayRebind {
                            track: te.key,
                            node: peer,
                            flow: *flow,
                        };
                        if self.media.send(cmd).is_ok() {
                            te.source_link = Some(link);
                            te.upstream_wanted = None;
                            rebound.push(t.sid.clone());
                        }
                    }
                }
                let was = self
                    .remotes
                    .get(&sid)
                    .and_then(|r| r.info.tracks.iter().find(|x| x.sid == t.sid))
                    .map(|x| x.muted);
                if was != Some(t.muted) {
                    te.addr.do_send(SetMuted(t.muted));
                }
                continue;
            }
            let Some(flow) = flows.get(t.sid.as_str()).copied() else {
                continue;
            };
            let key = crate::ids::new_track_key(self.media.room_tag());
            let video = t.r#type == lk::TrackType::Video as i32;
            if self
                .media
                .send(Command::RelayIn {
                    track: key,
                    node: peer,
                    flow,
                    video,
                })
                .is_err()
            {
                tracing::warn!(parent: &self.span, track = %t.sid, "media engine busy; relayed track skipped");
                continue;
            }
            let addr = Track::new(t.clone(), sid.clone(), key, self.media.clone(), &self.span)
                .with_need_sink(ctx.address().recipient())
                .start();
            self.tracks.insert(
                t.sid.clone(),
                TrackEntry {
                    addr,
                    publisher_sid: sid.clone(),
                    video,
                    last_n_cap: 3,
                    key,
                    source_link: Some(link),
                    upstream_wanted: None,
                    local_rank: 3,
                },
            );
            added.push(t.sid.clone());
        }
        self.remotes.insert(
            sid.clone(),
            Remote {
                info: info.clone(),
                link,
                // An update over the same link keeps the second path it may have.
                alt: self
                    .remotes
                    .get(&sid)
                    .filter(|r| r.link == link)
                    .and_then(|r| r.alt.clone()),
            },
        );
        let update = Resp::Update(lk::ParticipantUpdate {
            participants: vec![info.clone()],
        });
        for m in self.members.values() {
            m.addr.do_send(SendSignal(update.clone()));
        }
        let msg = LinkMsg::Participant(self.link_state(&info));
        self.flood(Some(link), msg);
        if !rebound.is_empty() {
            tracing::info!(parent: &self.span, participant = %sid, tracks = rebound.len(), "relayed tracks re-parented");
        }
        for t in &rebound {
            // Ask the new source for what our viewers and downstream links need.
            self.update_demand(t);
        }
        if !added.is_empty() {
            self.apply_last_n();
            let subscribers: Vec<String> = self
                .members
                .iter()
                .filter(|(_, m)| m.auto_subscribe)
                .map(|(s, _)| s.clone())
                .collect();
            for t in &added {
                for s in &subscribers {
                    self.subscribe(s, t);
                }
                // Downstream links may already want it (they learned it before we re-linked).
                self.update_demand(t);
            }
        }
    }

    /// Every `REPLAN_EVERY`: an edge asks the planner for its parent again. If the answer
    /// differs from the node its upstream link goes to (a node joined or came back), it
    /// switches **make-before-break**: it opens a link to the new parent as a *candidate*,
    /// which carries our participants up (so every node above learns the second path) and
    /// brings the room's state down; once the candidate has confirmed every participant the
    /// old upstream told us about (`try_switch`), the old link is closed, which moves every
    /// participant to its second path and re-binds the relayed tracks (keyframe requested).
    fn replan(&mut self, ctx: &mut Context<Self>) {
        let Some(f) = &self.fabric else { return };
        if !self.is_edge() || self.connecting || self.switching {
            return;
        }
        let Some((&old_id, old)) = self.links.iter().find(|(_, l)| l.upstream) else {
            return;
        };
        let old_peer = old.peer;
        self.switching = true;
        let dir = f.directory.clone();
        let name = self.info.name.clone();
        let origin = f.origin;
        let fut = async move {
            let parent = dir.parent(name.clone(), origin).await?;
            if parent == old_peer || parent == dir.node_id() {
                return Ok(None);
            }
            let io = dir.open_link(parent, name).await?;
            Ok::<_, String>(Some((parent, io)))
        };
        ctx.spawn(actix::fut::wrap_future(fut).map(
            move |res: Result<Option<(u64, LinkIo)>, String>, room: &mut Room, ctx| {
                let still = room.links.get(&old_id).is_some_and(|l| l.upstream);
                match res {
                    Ok(Some((parent, io))) if still => {
                        tracing::info!(parent: &room.span, from = old_peer, to = parent, "re-plan: bringing up a new upstream before dropping the old one");
                        let cid = room.attach_link(parent, io, true, true, ctx);
                        let deadline = std::time::Instant::now() + SWITCH_TIMEOUT;
                        room.try_switch(old_id, cid, deadline, ctx);
                    }
                    Ok(_) => room.switching = false,
                    Err(e) => {
                        room.switching = false;
                        tracing::debug!(parent: &room.span, error = %e, "re-plan failed; keeping the upstream");
                    }
                }
            },
        ));
    }

    /// Make-before-break, step two: switch to candidate `cid` once it has confirmed every
    /// participant known over the old upstream `old_id` (each has a second path through it);
    /// give the candidate up at `deadline`.
    fn try_switch(
        &mut self,
        old_id: u64,
        cid: u64,
        deadline: std::time::Instant,
        ctx: &mut Context<Self>,
    ) {
        let (Some(old), Some(c)) = (self.links.get(&old_id), self.links.get(&cid)) else {
            self.switching = false;
            return;
        };
        if !old.upstream || !c.candidate {
            self.switching = false;
            return;
        }
        let ready = self
            .remotes
            .values()
            .filter(|r| r.link == old_id)
            .all(|r| r.alt.as_ref().is_some_and(|(l, _)| *l == cid));
        if !ready {
            if std::time::Instant::now() >= deadline {
                tracing::warn!(parent: &self.span, "re-plan: the new upstream did not confirm the room in time; keeping the old one");
                self.close_link(cid, ctx);
                self.switching = false;
            } else {
                ctx.run_later(SWITCH_POLL, move |room, ctx| {
                    room.try_switch(old_id, cid, deadline, ctx)
                });
            }
            return;
        }
        // Switch: the candidate becomes the upstream, the old link a plain one, closed now.
        let peer = c.peer;
        if let Some(c) = self.links.get_mut(&cid) {
            c.candidate = false;
            c.upstream = true;
        }
        if let Some(o) = self.links.get_mut(&old_id) {
            o.upstream = false;
        }
        if let Some(f) = &self.fabric {
            f.directory.upstream(&self.info.name, Some(peer));
        }
        tracing::info!(parent: &self.span, to = peer, "re-plan: switched upstream; closing the old link");
        self.close_link(old_id, ctx);
        self.promote(cid);
        self.switching = false;
    }

    /// A link that just became our upstream: ask it for what our viewers and downstream links
    /// need of the tracks it is the source of.
    fn promote(&mut self, link: u64) {
        let tracks: Vec<String> = self
            .tracks
            .iter()
            .filter(|(_, t)| t.source_link == Some(link))
            .map(|(s, _)| s.clone())
            .collect();
        for t in tracks {
            self.update_demand(&t);
        }
    }

    /// Closes a link from our side: dropping its queue ends the writer task, which ends the
    /// stream (the peer sees the link close); our side is cleaned up like a peer-side close.
    fn close_link(&mut self, id: u64, ctx: &mut Context<Self>) {
        self.on_link_closed(id, ctx);
    }

    /// An identity (re)appeared with session `sid` (a local join, or a new remote): an orphan
    /// with the same identity and another sid is a session that died with the old upstream —
    /// it leaves now, before the newcomer is announced (clients key participants by identity).
    fn drop_orphans_named(&mut self, identity: &str, sid: &str) {
        let stale: Vec<(String, u64)> = self
            .remotes
            .iter()
            .filter(|(s, r)| {
                r.info.identity == identity
                    && s.as_str() != sid
                    && !self.links.contains_key(&r.link)
            })
            .map(|(s, r)| (s.clone(), r.link))
            .collect();
        for (s, link) in stale {
            if let Some(r) = self.remotes.get(&s) {
                let mut info = r.info.clone();
                info.state = lk::participant_info::State::Disconnected as i32;
                info.disconnect_reason = lk::DisconnectReason::DuplicateIdentity as i32;
                info.version += 1;
                self.remove_remote(link, info);
            }
        }
    }

    /// Re-parenting: participants still attached to a link that is gone were not confirmed by
    /// the new parent (they died with the old one, or left meanwhile): they leave now, with
    /// their tracks, as any departure (downstream links are told).
    fn sweep_orphans(&mut self) {
        let orphans: Vec<(String, u64)> = self
            .remotes
            .iter()
            .filter(|(_, r)| !self.links.contains_key(&r.link))
            .map(|(sid, r)| (sid.clone(), r.link))
            .collect();
        if orphans.is_empty() {
            return;
        }
        tracing::info!(parent: &self.span, count = orphans.len(), "participants of a dead upstream not confirmed by the new one: gone");
        for (sid, link) in orphans {
            if let Some(r) = self.remotes.get(&sid) {
                let mut info = r.info.clone();
                info.state = lk::participant_info::State::Disconnected as i32;
                info.disconnect_reason = lk::DisconnectReason::ServerShutdown as i32;
                info.version += 1;
                self.remove_remote(link, info);
            }
        }
    }

    /// Cleanup after a relayed track ended: downstream wants of it are void.
    fn remote_track_gone(&mut self, track_sid: &str) {
        for l in self.links.values_mut() {
            l.wants.remove(track_sid);
        }
    }
}

impl Handler<RelayNeed> for Room {
    type Result = ();
    fn handle(&mut self, msg: RelayNeed, _ctx: &mut Self::Context) {
        if let Some(t) = self.tracks.get_mut(&msg.track_sid) {
            if t.source_link.is_some() && t.local_rank != msg.rank {
                t.local_rank = msg.rank;
                self.update_demand(&msg.track_sid);
            }
        }
    }
}

impl Room {
    /// A remote participant left (or its link went down): `info` is its final state.
    fn remove_remote(&mut self, link: u64, info: lk::ParticipantInfo) {
        let sid = info.sid.clone();
        if self.remotes.remove(&sid).is_none() {
            return;
        }
        self.remote_levels.remove(&sid);
        let published: Vec<String> = self
            .tracks
            .iter()
            .filter(|(_, t)| t.publisher_sid == sid)
            .map(|(s, _)| s.clone())
            .collect();
        for t in published {
            self.remove_track(&t);
            self.remote_track_gone(&t);
        }
        let mut info = info;
        info.tracks.clear();
        self.flood(
            Some(link),
            LinkMsg::Gone(wire::ParticipantGone {
                info: Some(info.clone()),
            }),
        );
        let update = Resp::Update(lk::ParticipantUpdate {
            participants: vec![info],
        });
        for m in self.members.values() {
            m.addr.do_send(SendSignal(update.clone()));
        }
    }
}
