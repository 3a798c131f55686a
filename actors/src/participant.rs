//! The Participant actor: one client session. It owns the signal channel to the client and the
//! participant's two peer connections (publisher: the client offers; subscriber: we offer),
//! turns LiveKit signal requests into room and media commands, and media events into signal
//! responses.
//!
//! # The life of one signal message
//!
//! The WebSocket reader (in the binary) decodes a `SignalRequest` and `send`s it here as
//! [`SignalIn`] (the bounded mailbox applies back-pressure to a flooding client). This actor
//! checks permissions and limits, then either answers directly (ping), asks the [`Room`] to
//! change shared state (mute, subscribe, publish), or commands the media engine (SDP, ICE).
//! Replies go into the bounded signal queue, which the WebSocket writer drains; a client that
//! does not read its queue is disconnected rather than allowed to grow memory.

// Deprecated LiveKit fields (layers, stereo, disable_dtx, simulcast) are still what clients send.
#![allow(deprecated)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use livekit_protocol as lk;
use lk::signal_request::Message as Req;
use lk::signal_response::Message as Resp;
use prost::Message as _;
use tokio::sync::mpsc;

use crate::config::RoomSettings;
use crate::ids::{new_peer_id, new_sid, new_track_key};
use crate::media::sdp::{candidate_from_init, media_sections};
use crate::media::{Command, MediaHandle, PeerEvent, PeerId, PeerRole, TrackKey};
use crate::metrics::METRICS;
use crate::room::{self, Room};

/// How long a session outlives a closed peer connection, waiting for the client's `leave`.
const PEER_CLOSED_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// Capacity of each peer's event queue from the media engine.
const PEER_EVENT_QUEUE: usize = 1024;

/// Everything needed to start a participant session.
pub struct ParticipantInit {
    pub identity: String,
    pub name: String,
    pub metadata: String,
    pub attributes: HashMap<String, String>,
    pub permission: lk::ParticipantPermission,
    pub kind: i32,
    pub auto_subscribe: bool,
    pub protocol: i32,
    pub client_protocol: i32,
    pub room: Addr<Room>,
    pub room_span: tracing::Span,
    pub media: MediaHandle,
    pub settings: Arc<RoomSettings>,
    /// Responses to the client; the WebSocket writer drains it.
    pub signal_tx: mpsc::Sender<Resp>,
}

struct Published {
    track_sid: String,
    key: TrackKey,
}

/// One participant session. See the module documentation.
pub struct Participant {
    sid: String,
    init: ParticipantInit,
    info: lk::ParticipantInfo,
    pub_peer: PeerId,
    sub_peer: PeerId,
    /// Tracks announced with AddTrackRequest, waiting for their m-line: cid → info.
    pending: HashMap<String, lk::TrackInfo>,
    /// Publisher mid → published track.
    published: HashMap<String, Published>,
    joined: bool,
    left: bool,
    active: bool,
    next_offer_id: u32,
    /// Latest link statistics of the publisher and subscriber connections.
    pub_link: Option<crate::quality::LinkStats>,
    sub_link: Option<crate::quality::LinkStats>,
    span: tracing::Span,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn stream_for_source(source: i32) -> &'static str {
    if source == lk::TrackSource::ScreenShare as i32
        || source == lk::TrackSource::ScreenShareAudio as i32
    {
        "screen"
    } else {
        "camera"
    }
}

impl Participant {
    /// Create a participant session and start it on `arbiter` (the control-plane thread).
    pub fn start_session(
        init: ParticipantInit,
        arbiter: &ArbiterHandle,
    ) -> (Addr<Participant>, String) {
        let sid = new_sid("PA_");
        let ms = now_ms();
        let info = lk::ParticipantInfo {
            sid: sid.clone(),
            identity: init.identity.clone(),
            state: lk::participant_info::State::Joined as i32,
            metadata: init.metadata.clone(),
            joined_at: ms / 1000,
            joined_at_ms: ms,
            name: init.name.clone(),
            version: 1,
            permission: Some(init.permission.clone()),
            kind: init.kind,
            attributes: init.attributes.clone(),
            client_protocol: init.client_protocol,
            ..Default::default()
        };
        let span = tracing::info_span!(parent: &init.room_span, "participant", sid = %sid, identity = %init.identity);
        let p = Participant {
            sid: sid.clone(),
            init,
            info,
            pub_peer: new_peer_id(),
            sub_peer: new_peer_id(),
            pending: HashMap::new(),
            published: HashMap::new(),
            joined: false,
            left: false,
            active: false,
            next_offer_id: 1,
            pub_link: None,
            sub_link: None,
            span,
        };
        (Participant::start_in_arbiter(arbiter, move |_| p), sid)
    }

    fn perm(&self) -> &lk::ParticipantPermission {
        &self.init.permission
    }

    /// Queue a response to the client. A client whose queue is full is too slow: drop it.
    fn send(&mut self, msg: Resp, ctx: &mut Context<Self>) {
        match self.init.signal_tx.try_send(msg) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(parent: &self.span, "signal queue full (limit.signal_queue); disconnecting slow client");
                self.leave(lk::DisconnectReason::SignalClose, ctx);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.leave(lk::DisconnectReason::SignalClose, ctx)
            }
        }
    }

    /// Leave the room and stop the session.
    fn leave(&mut self, reason: lk::DisconnectReason, ctx: &mut Context<Self>) {
        if !self.left {
            self.left = true;
            if self.joined {
                self.init.room.do_send(room::Leave {
                    sid: self.sid.clone(),
                    reason,
                });
            }
        }
        ctx.stop();
    }

    /// Tell the client why it is being disconnected, then stop.
    fn disconnect(&mut self, reason: lk::DisconnectReason, ctx: &mut Context<Self>) {
        let _ = self.init.signal_tx.try_send(Resp::Leave(lk::LeaveRequest {
            can_reconnect: false,
            reason: reason as i32,
            action: lk::leave_request::Action::Disconnect as i32,
            regions: None,
        }));
        self.leave(reason, ctx);
    }

    fn request_error(
        &mut self,
        request_id: u32,
        reason: lk::request_response::Reason,
        message: String,
        request: Option<lk::request_response::Request>,
        ctx: &mut Context<Self>,
    ) {
        METRICS.inc_signal_errors();
        tracing::info!(parent: &self.span, %message, "request rejected");
        self.send(
            Resp::RequestResponse(lk::RequestResponse {
                request_id,
                reason: reason as i32,
                message,
                request,
            }),
            ctx,
        );
    }

    fn can_publish_source(&self, source: i32) -> bool {
        let p = self.perm();
        p.can_publish
            && (p.can_publish_sources.is_empty() || p.can_publish_sources.contains(&source))
    }

    fn handle_add_track(&mut self, req: lk::AddTrackRequest, ctx: &mut Context<Self>) {
        if !self.can_publish_source(req.source) {
            let msg = format!(
                "not allowed to publish source {} (token grants)",
                req.source
            );
            self.request_error(
                0,
                lk::request_response::Reason::NotAllowed,
                msg,
                Some(lk::request_response::Request::AddTrack(req)),
                ctx,
            );
            return;
        }
        let count = self.pending.len() + self.published.len();
        if count >= self.init.settings.max_tracks_per_participant {
            let msg = format!(
                "too many tracks (limit.max_tracks_per_participant = {})",
                self.init.settings.max_tracks_per_participant
            );
            self.request_error(
                0,
                lk::request_response::Reason::LimitExceeded,
                msg,
                Some(lk::request_response::Request::AddTrack(req)),
                ctx,
            );
            return;
        }
        if req.cid.is_empty() || self.pending.contains_key(&req.cid) {
            let msg = "track cid missing or already pending".to_string();
            self.request_error(
                0,
                lk::request_response::Reason::InvalidRequest,
                msg,
                Some(lk::request_response::Request::AddTrack(req)),
                ctx,
            );
            return;
        }
        let simulcast =
            req.layers.len() > 1 || req.simulcast_codecs.iter().any(|c| c.layers.len() > 1);
        let stream = if req.stream.is_empty() {
            stream_for_source(req.source).to_string()
        } else {
            req.stream.clone()
        };
        let info = lk::TrackInfo {
            sid: new_sid("TR_"),
            name: req.name.clone(),
            r#type: req.r#type,
            muted: req.muted,
            width: req.width,
            height: req.height,
            simulcast,
            disable_dtx: req.disable_dtx,
            source: req.source,
            layers: req.layers.clone(),
            codecs: req
                .simulcast_codecs
                .iter()
                .map(|c| lk::SimulcastCodecInfo {
                    mime_type: c.codec.clone(),
                    cid: c.cid.clone(),
                    layers: c.layers.clone(),
                    ..Default::default()
                })
                .collect(),
            stereo: req.stereo,
            disable_red: req.disable_red,
            encryption: req.encryption,
            stream,
            audio_features: req.audio_features.clone(),
            backup_codec_policy: req.backup_codec_policy,
            ..Default::default()
        };
        tracing::info!(parent: &self.span, cid = %req.cid, track = %info.sid, "track announced");
        self.pending.insert(req.cid.clone(), info.clone());
        self.send(
            Resp::TrackPublished(lk::TrackPublishedResponse {
                cid: req.cid,
                track: Some(info),
            }),
            ctx,
        );
    }

    fn handle_offer(&mut self, sd: lk::SessionDescription, ctx: &mut Context<Self>) {
        let sections = media_sections(&sd.sdp);
        let mut bind = Vec::new();
        let mut prefs: Vec<(String, String)> = Vec::new();
        let mut newly: Vec<(lk::TrackInfo, TrackKey)> = Vec::new();
        for s in &sections {
            if !(s.kind == "audio" || s.kind == "video") || !s.is_sending() || s.mid.is_empty() {
                continue;
            }
            if self.published.contains_key(&s.mid) {
                continue;
            }
            let Some(cid) = &s.msid_track else { continue };
            let Some(mut info) = self.pending.remove(cid) else {
                continue;
            };
            info.mid = s.mid.clone();
            if let Some(c) = &s.codec {
                info.mime_type = format!("{}/{}", s.kind, c);
            }
            // The codec the client asked for (`AddTrackRequest.simulcast_codecs`, e.g. "vp9")
            // is put first in the offer, so the answer makes the client send it.
            if let Some(want) = info.codecs.first().map(|c| c.mime_type.clone()) {
                let name = want.rsplit('/').next().unwrap_or("").to_string();
                if !name.is_empty()
                    && s.kind == "video"
                    && s.codecs.iter().any(|c| c.eq_ignore_ascii_case(&name))
                {
                    info.mime_type = format!("video/{}", name.to_ascii_uppercase());
                    prefs.push((s.mid.clone(), name));
                }
            }
            let key = new_track_key(self.init.media.room_tag());
            bind.push((s.mid.clone(), key));
            newly.push((info, key));
        }
        let mut removed = Vec::new();
        for (mid, p) in &self.published {
            let still = sections.iter().any(|s| s.mid == *mid && s.is_sending());
            if !still {
                removed.push((mid.clone(), p.track_sid.clone(), p.key));
            }
        }
        for (mid, _, _) in &removed {
            self.published.remove(mid);
        }
        for (info, key) in &newly {
            self.published.insert(
                info.mid.clone(),
                Published {
                    track_sid: info.sid.clone(),
                    key: *key,
                },
            );
        }
        let unbind: Vec<TrackKey> = removed.iter().map(|(_, _, k)| *k).collect();
        let media = self.init.media.clone();
        let peer = self.pub_peer;
        let sdp = crate::media::sdp::prefer_codecs(&sd.sdp, &prefs);
        let offer_id = sd.id;
        let fut = async move { media.publisher_offer(peer, sdp, bind, unbind).await };
        ctx.wait(fut.into_actor(self).map(move |res, act, ctx| match res {
            Ok(answer) => {
                let mid_to_track_id = act
                    .published
                    .iter()
                    .map(|(mid, p)| (mid.clone(), p.track_sid.clone()))
                    .collect();
                act.send(
                    Resp::Answer(lk::SessionDescription {
                        r#type: "answer".into(),
                        sdp: answer,
                        id: offer_id,
                        mid_to_track_id,
                    }),
                    ctx,
                );
                for (info, key) in newly {
                    act.info.tracks.push(info.clone());
                    act.init.room.do_send(room::PublishTrack {
                        sid: act.sid.clone(),
                        track: info,
                        key,
                    });
                }
                for (_, track_sid, _) in removed {
                    act.info.tracks.retain(|t| t.sid != track_sid);
                    act.init.room.do_send(room::UnpublishTrack {
                        sid: act.sid.clone(),
                        track_sid: track_sid.clone(),
                    });
                    act.send(
                        Resp::TrackUnpublished(lk::TrackUnpublishedResponse { track_sid }),
                        ctx,
                    );
                }
            }
            Err(e) => {
                METRICS.inc_signal_errors();
                tracing::warn!(parent: &act.span, error = %e, "publisher offer rejected; disconnecting");
                act.disconnect(lk::DisconnectReason::StateMismatch, ctx);
            }
        }));
    }

    fn handle_answer(&mut self, sd: lk::SessionDescription, ctx: &mut Context<Self>) {
        let media = self.init.media.clone();
        let peer = self.sub_peer;
        let fut = async move { media.subscriber_answer(peer, sd.sdp).await };
        ctx.wait(fut.into_actor(self).map(|res, act, ctx| {
            if let Err(e) = res {
                METRICS.inc_signal_errors();
                tracing::warn!(parent: &act.span, error = %e, "subscriber answer rejected; disconnecting");
                act.disconnect(lk::DisconnectReason::StateMismatch, ctx);
            }
        }));
    }

    fn handle_mute(&mut self, req: lk::MuteTrackRequest) {
        if let Some(info) = self.pending.values_mut().find(|t| t.sid == req.sid) {
            info.muted = req.muted;
            return;
        }
        if let Some(t) = self.info.tracks.iter_mut().find(|t| t.sid == req.sid) {
            t.muted = req.muted;
            self.init.room.do_send(room::MuteTrack {
                sid: self.sid.clone(),
                track_sid: req.sid,
                muted: req.muted,
            });
        }
    }

    fn handle_update_metadata(
        &mut self,
        req: lk::UpdateParticipantMetadata,
        ctx: &mut Context<Self>,
    ) {
        let rid = req.request_id;
        if !self.perm().can_update_metadata {
            let msg = "not allowed to update own metadata (canUpdateOwnMetadata)".to_string();
            self.request_error(
                rid,
                lk::request_response::Reason::NotAllowed,
                msg,
                Some(lk::request_response::Request::UpdateMetadata(req)),
                ctx,
            );
            return;
        }
        let size = req.metadata.len()
            + req.name.len()
            + req
                .attributes
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>();
        if size > self.init.settings.max_metadata_bytes {
            let msg = format!(
                "metadata too large (limit.max_metadata_bytes = {})",
                self.init.settings.max_metadata_bytes
            );
            self.request_error(
                rid,
                lk::request_response::Reason::LimitExceeded,
                msg,
                Some(lk::request_response::Request::UpdateMetadata(req)),
                ctx,
            );
            return;
        }
        self.init.room.do_send(room::UpdateMetadata {
            sid: self.sid.clone(),
            update: req,
        });
    }

    /// The worse of the two connections, but "lost" only when neither hears the client.
    fn combined_link(&self) -> Option<crate::quality::LinkStats> {
        let (a, b) = match (self.pub_link, self.sub_link) {
            (Some(a), Some(b)) => (a, b),
            (Some(a), None) | (None, Some(a)) => (a, a),
            (None, None) => return None,
        };
        Some(crate::quality::LinkStats {
            loss: a.loss.max(b.loss),
            rtt: a.rtt.max(b.rtt),
            jitter: a.jitter.max(b.jitter),
            silent_for: a.silent_for.min(b.silent_for),
        })
    }

    fn handle_data(&mut self, reliable: bool, data: Vec<u8>, ctx: &mut Context<Self>) {
        let _ = ctx;
        if !self.perm().can_publish_data {
            METRICS.inc_dropped_data();
            tracing::debug!(parent: &self.span, "data packet without canPublishData; dropped");
            return;
        }
        let stamped = match crate::codec::stamp_data_packet(
            &data,
            self.init.settings.max_data_packet_bytes,
            &self.init.identity,
            &self.sid,
            self.perm().hidden,
        ) {
            Ok(s) => s,
            Err(e) => {
                METRICS.inc_dropped_data();
                tracing::debug!(parent: &self.span, error = %e, "data packet dropped");
                return;
            }
        };
        self.init.room.do_send(room::RouteData {
            from_sid: self.sid.clone(),
            reliable,
            destinations: stamped.destinations,
            data: stamped.packet.encode_to_vec(),
        });
    }
}

impl Actor for Participant {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(256);
        METRICS
            .participants
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (pub_tx, pub_rx) = mpsc::channel(PEER_EVENT_QUEUE);
        let (sub_tx, sub_rx) = mpsc::channel(PEER_EVENT_QUEUE);
        let pub_peer = self.pub_peer;
        let sub_peer = self.sub_peer;
        ctx.add_stream(PeerEvents {
            peer: pub_peer,
            rx: pub_rx,
        });
        ctx.add_stream(PeerEvents {
            peer: sub_peer,
            rx: sub_rx,
        });
        let media = self.init.media.clone();
        let room = self.init.room.clone();
        let join = room::Join {
            info: self.info.clone(),
            addr: ctx.address(),
            sub_peer,
            auto_subscribe: self.init.auto_subscribe,
            hidden: self.perm().hidden,
        };
        let fut = async move {
            media
                .add_peer(pub_peer, PeerRole::Publisher, pub_tx)
                .await?;
            media
                .add_peer(sub_peer, PeerRole::Subscriber, sub_tx)
                .await?;
            let r = room
                .send(join)
                .await
                .map_err(|e| crate::RoomError::Mailbox(e.to_string()))??;
            Ok::<_, crate::RoomError>(r)
        };
        ctx.wait(fut.into_actor(self).map(|res, act, ctx| match res {
            Ok((room_info, others)) => {
                act.joined = true;
                let s = &act.init.settings;
                let server_info = lk::ServerInfo {
                    edition: lk::server_info::Edition::Standard as i32,
                    version: crate::LIVEKIT_COMPAT_VERSION.to_string(),
                    protocol: crate::PROTOCOL_VERSION,
                    region: s.region.clone(),
                    node_id: s.node_id.clone(),
                    debug_info: format!("arbor {}", env!("CARGO_PKG_VERSION")),
                    ..Default::default()
                };
                // Order matters to clients: the first video codec is their fallback.
                let scalable: &[&str] = if s.scalable_codecs {
                    &["video/VP9", "video/AV1"]
                } else {
                    &[]
                };
                let codecs = ["audio/opus", "video/VP8", "video/H264"]
                    .iter()
                    .chain(scalable)
                    .map(|m| lk::Codec {
                        mime: m.to_string(),
                        fmtp_line: String::new(),
                    })
                    .collect();
                let join = lk::JoinResponse {
                    room: Some(room_info),
                    participant: Some(act.info.clone()),
                    other_participants: others,
                    server_version: crate::LIVEKIT_COMPAT_VERSION.to_string(),
                    server_region: s.region.clone(),
                    subscriber_primary: act.init.protocol > 2 && act.perm().can_subscribe,
                    ping_timeout: s.ping_timeout as i32,
                    ping_interval: s.ping_interval as i32,
                    server_info: Some(server_info),
                    enabled_publish_codecs: codecs,
                    ..Default::default()
                };
                tracing::info!(parent: &act.span, "joined");
                act.send(Resp::Join(join), ctx);
            }
            Err(e) => {
                tracing::info!(parent: &act.span, error = %e, "join failed");
                act.disconnect(lk::DisconnectReason::JoinFailure, ctx);
            }
        }));
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        METRICS
            .participants
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        if !self.left && self.joined {
            self.init.room.do_send(room::Leave {
                sid: self.sid.clone(),
                reason: lk::DisconnectReason::SignalClose,
            });
        }
        let _ = self.init.media.send(Command::RemovePeer {
            peer: self.pub_peer,
        });
        let _ = self.init.media.send(Command::RemovePeer {
            peer: self.sub_peer,
        });
        tracing::info!(parent: &self.span, "session ended");
    }
}

/// A decoded request from the client's WebSocket.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SignalIn(pub Req);

/// A response to forward to the client (from the room).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SendSignal(pub Resp);

/// The server disconnects this participant.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Kick {
    pub reason: lk::DisconnectReason,
}

/// The client's WebSocket closed (or timed out).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SocketClosed {
    /// The client sent `leave` before closing.
    pub clean: bool,
}

struct PeerEvents {
    peer: PeerId,
    rx: mpsc::Receiver<PeerEvent>,
}

impl futures_core::Stream for PeerEvents {
    type Item = (PeerId, PeerEvent);
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let peer = self.peer;
        self.rx.poll_recv(cx).map(|o| o.map(|e| (peer, e)))
    }
}

impl StreamHandler<(PeerId, PeerEvent)> for Participant {
    fn handle(&mut self, (peer, ev): (PeerId, PeerEvent), ctx: &mut Self::Context) {
        match ev {
            PeerEvent::Connected => {
                tracing::debug!(parent: &self.span, %peer, "peer connected");
                if !self.active && self.joined {
                    self.active = true;
                    self.init.room.do_send(room::SetState {
                        sid: self.sid.clone(),
                        state: lk::participant_info::State::Active,
                    });
                }
            }
            PeerEvent::IceDisconnected => {
                tracing::debug!(parent: &self.span, %peer, "ICE disconnected");
            }
            PeerEvent::Closed => {
                // A client that leaves often closes its PeerConnections just before its
                // `leave` arrives on the WebSocket. Give the signal channel a short grace to say
                // why; if it does not, the transport is gone and so is the session.
                tracing::info!(parent: &self.span, %peer, "peer connection closed");
                ctx.run_later(PEER_CLOSED_GRACE, |act, ctx| {
                    if !act.left {
                        tracing::info!(parent: &act.span, "transport lost; ending session");
                        act.disconnect(lk::DisconnectReason::ConnectionTimeout, ctx);
                    }
                });
            }
            PeerEvent::Offer { sdp, mid_to_track } => {
                let id = self.next_offer_id;
                self.next_offer_id += 1;
                self.send(
                    Resp::Offer(lk::SessionDescription {
                        r#type: "offer".into(),
                        sdp,
                        id,
                        mid_to_track_id: mid_to_track.into_iter().collect(),
                    }),
                    ctx,
                );
            }
            PeerEvent::Data { reliable, data } => self.handle_data(reliable, data, ctx),
            PeerEvent::StreamState {
                track_sid,
                publisher_sid,
                paused,
            } => {
                let state = if paused {
                    lk::StreamState::Paused
                } else {
                    lk::StreamState::Active
                };
                self.send(
                    Resp::StreamStateUpdate(lk::StreamStateUpdate {
                        stream_states: vec![lk::StreamStateInfo {
                            participant_sid: publisher_sid,
                            track_sid,
                            state: state as i32,
                        }],
                    }),
                    ctx,
                );
            }
            PeerEvent::AudioLevel {
                track,
                level,
                active,
            } => {
                if let Some(p) = self.published.values().find(|p| p.key == track) {
                    self.init.room.do_send(room::AudioLevel {
                        sid: self.sid.clone(),
                        track_sid: p.track_sid.clone(),
                        level,
                        active,
                    });
                }
            }
            PeerEvent::Stats(link) => {
                if peer == self.pub_peer {
                    self.pub_link = Some(link);
                } else {
                    self.sub_link = Some(link);
                }
                if let Some(combined) = self.combined_link() {
                    self.init.room.do_send(room::ConnQuality {
                        sid: self.sid.clone(),
                        quality: crate::quality::quality(&combined),
                        score: crate::quality::score(&combined),
                    });
                }
            }
        }
    }

    fn finished(&mut self, _ctx: &mut Self::Context) {
        // One peer's event stream ended; `Closed` already handled the session.
    }
}

impl Handler<SignalIn> for Participant {
    type Result = ();
    fn handle(&mut self, SignalIn(req): SignalIn, ctx: &mut Self::Context) {
        match req {
            Req::Offer(sd) => self.handle_offer(sd, ctx),
            Req::Answer(sd) => self.handle_answer(sd, ctx),
            Req::Trickle(t) => {
                let peer = if t.target == lk::SignalTarget::Subscriber as i32 {
                    self.sub_peer
                } else {
                    self.pub_peer
                };
                if let Some(candidate) = candidate_from_init(&t.candidate_init) {
                    let _ = self
                        .init
                        .media
                        .send(Command::RemoteCandidate { peer, candidate });
                }
            }
            Req::AddTrack(req) => self.handle_add_track(req, ctx),
            Req::Mute(req) => self.handle_mute(req),
            Req::Subscription(sub) => {
                let mut track_sids = sub.track_sids;
                for pt in sub.participant_tracks {
                    track_sids.extend(pt.track_sids);
                }
                self.init.room.do_send(room::UpdateSubscription {
                    sid: self.sid.clone(),
                    track_sids,
                    subscribe: sub.subscribe,
                });
            }
            Req::Leave(_) => {
                tracing::info!(parent: &self.span, "client left");
                self.leave(lk::DisconnectReason::ClientInitiated, ctx);
            }
            Req::Ping(_) => self.send(Resp::Pong(now_ms()), ctx),
            Req::PingReq(p) => self.send(
                Resp::PongResp(lk::Pong {
                    last_ping_timestamp: p.timestamp,
                    timestamp: now_ms(),
                }),
                ctx,
            ),
            Req::UpdateMetadata(req) => self.handle_update_metadata(req, ctx),
            Req::TrackSetting(settings) => self.init.room.do_send(room::TrackSettings {
                sid: self.sid.clone(),
                settings,
            }),
            // Accepted and ignored, as the reference server does for features not implemented
            // yet (adaptive stream settings arrive here; see ARCHITECTURE.md non-goals).
            _ => {}
        }
    }
}

impl Handler<SendSignal> for Participant {
    type Result = ();
    fn handle(&mut self, msg: SendSignal, ctx: &mut Self::Context) {
        self.send(msg.0, ctx);
    }
}

impl Handler<Kick> for Participant {
    type Result = ();
    fn handle(&mut self, msg: Kick, ctx: &mut Self::Context) {
        tracing::info!(parent: &self.span, reason = ?msg.reason, "disconnected by server");
        // The room already forgot us when it kicks us.
        self.left = true;
        self.disconnect(msg.reason, ctx);
    }
}

impl Handler<SocketClosed> for Participant {
    type Result = ();
    fn handle(&mut self, msg: SocketClosed, ctx: &mut Self::Context) {
        let reason = if msg.clean {
            lk::DisconnectReason::ClientInitiated
        } else {
            lk::DisconnectReason::SignalClose
        };
        self.leave(reason, ctx);
    }
}

/// The server changed this participant's permission (`UpdateParticipant`). It applies at once:
/// tracks whose source is no longer allowed are unpublished (the client is told with
/// `track_unpublished`), and later requests are checked against the new grants.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetPermission(pub lk::ParticipantPermission);

impl Handler<SetPermission> for Participant {
    type Result = ();
    fn handle(&mut self, SetPermission(perm): SetPermission, ctx: &mut Self::Context) {
        tracing::info!(parent: &self.span, ?perm, "permission changed by the server");
        self.init.permission = perm.clone();
        self.info.permission = Some(perm);
        let revoked: Vec<String> = self
            .published
            .iter()
            .filter(|(_, p)| {
                let source = self
                    .info
                    .tracks
                    .iter()
                    .find(|t| t.sid == p.track_sid)
                    .map(|t| t.source)
                    .unwrap_or_default();
                !self.can_publish_source(source)
            })
            .map(|(mid, _)| mid.clone())
            .collect();
        for mid in revoked {
            let Some(p) = self.published.remove(&mid) else {
                continue;
            };
            self.info.tracks.retain(|t| t.sid != p.track_sid);
            self.init.room.do_send(room::UnpublishTrack {
                sid: self.sid.clone(),
                track_sid: p.track_sid.clone(),
            });
            self.send(
                Resp::TrackUnpublished(lk::TrackUnpublishedResponse {
                    track_sid: p.track_sid,
                }),
                ctx,
            );
        }
        let pending: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, t)| !self.can_publish_source(t.source))
            .map(|(cid, _)| cid.clone())
            .collect();
        for cid in pending {
            self.pending.remove(&cid);
        }
    }
}
