//! One simulated LiveKit participant: the signalling WebSocket plus up to two WebRTC peer
//! connections (webrtc-rs), exactly as a v0 (`/rtc`) LiveKit client uses them.
//!
//! ```text
//!   connect ws://…/rtc (Authorization: Bearer <jwt>)
//!   ◄─ join                          JoinResponse (subscriber_primary)
//!   ─► add_track ×2                  AddTrackRequest{cid = local track id}   (publishers)
//!   ─► offer                         publisher PC: sendonly VP8 + Opus, full SDP, no trickle
//!   ◄─ track_published ×2, answer
//!   ◄─ offer  ─► answer (same id)    subscriber PC, once per renegotiation
//!   ─► ping / ping_req every 5 s     keep-alive
//!   ─► leave                         when told to stop
//! ```
//!
//! Media out: the shared [`Clip`] is looped through `TrackLocalStaticSample::write_sample`
//! (webrtc-rs packetises and re-stamps). Media in: each remote track gets one task that reads
//! RTP packets and feeds a [`TrackRecv`] (sequence gaps → loss, RFC 3550 jitter); nothing is
//! decoded. Interceptors (NACK, receiver reports, TWCC) are off unless asked for: they would
//! double the client's cost per packet, and a load generator must stay cheap.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use livekit_protocol as proto;
use prost::Message as _;
use rtc::media::Sample;
use rtc::media_stream::MediaStreamTrack;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters, RTCRtpEncodingParameters,
    RtpCodecKind,
};
use tokio::sync::{mpsc, watch, Notify};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use webrtc::media_stream::track_local::static_sample::TrackLocalStaticSample;
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::media_stream::Track;
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
    RTCConfigurationBuilder, RTCIceCandidateInit, RTCIceGatheringState, RTCPeerConnectionState,
    RTCSessionDescription, Registry as InterceptorRegistry, SettingEngineBuilder,
};
use webrtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};

use crate::clip::Clip;
use crate::stats::{Registry, TrackRecv};
use crate::LoadError;

/// How long a participant may take from connect to "joined" (see [`Spec::expect_media`]).
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound on queued outgoing signal messages per participant.
const SIGNAL_QUEUE: usize = 64;
/// Keep-alive period (the server announces ping_interval = 5 s).
const PING_INTERVAL: Duration = Duration::from_secs(5);

/// Where and how to connect (shared by every participant of a run).
#[derive(Debug, Clone)]
pub struct Target {
    /// `ws://127.0.0.1:7880`
    pub ws_url: String,
    pub api_key: String,
    pub api_secret: String,
    /// Local address the peer connections bind (a namespace address, never loopback: the
    /// server is ICE-lite and reachable on its veth address).
    pub bind_ip: IpAddr,
    /// Enable webrtc-rs' default interceptors (NACK, RTCP reports, TWCC).
    pub interceptors: bool,
}

/// One participant's role.
#[derive(Debug, Clone)]
pub struct Spec {
    pub room: String,
    pub identity: String,
    /// Publish the clip (one VP8 + one Opus track).
    pub publish: bool,
    /// Subscribe (auto-subscribe to everything in the room).
    pub subscribe: bool,
    /// Count the participant as joined only when its first media packet arrives (true when a
    /// publisher is already in the room); otherwise when its publisher PC connects or, for a
    /// pure subscriber without media, when the join response arrives.
    pub expect_media: bool,
}

pub(crate) enum PcEvent {
    Gathered,
    State(RTCPeerConnectionState),
}

struct Handler {
    events: mpsc::Sender<PcEvent>,
    reg: Arc<Registry>,
    first_media: Arc<Notify>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            let _ = self.events.try_send(PcEvent::Gathered);
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        let _ = self.events.try_send(PcEvent::State(state));
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let kind = track.kind().await;
        let clock = if kind == RtpCodecKind::Video {
            90_000
        } else {
            48_000
        };
        let mut recv = TrackRecv::new(self.reg.track(), clock);
        let first = self.first_media.clone();
        tokio::spawn(async move {
            let mut notified = false;
            while let Some(ev) = track.poll().await {
                if let TrackRemoteEvent::OnRtpPacket(p) = ev {
                    recv.on_packet(Instant::now(), p.header.sequence_number, p.header.timestamp);
                    if !notified {
                        first.notify_one();
                        notified = true;
                    }
                }
            }
        });
    }
}

fn vp8() -> RTCRtpCodecParameters {
    RTCRtpCodecParameters {
        rtp_codec: RTCRtpCodec {
            mime_type: "video/VP8".to_owned(),
            clock_rate: 90_000,
            channels: 0,
            sdp_fmtp_line: String::new(),
            rtcp_feedback: vec![],
        },
        payload_type: 96,
    }
}

fn opus() -> RTCRtpCodecParameters {
    RTCRtpCodecParameters {
        rtp_codec: RTCRtpCodec {
            mime_type: "audio/opus".to_owned(),
            clock_rate: 48_000,
            channels: 2,
            sdp_fmtp_line: "minptime=10;useinbandfec=1".to_owned(),
            rtcp_feedback: vec![],
        },
        payload_type: 111,
    }
}

pub(crate) struct Pc {
    pub(crate) pc: Arc<dyn PeerConnection>,
    pub(crate) events: mpsc::Receiver<PcEvent>,
    gathered: bool,
    pub(crate) connected: bool,
}

impl Pc {
    pub(crate) async fn new(
        t: &Target,
        reg: &Arc<Registry>,
        first_media: &Arc<Notify>,
    ) -> Result<Self, LoadError> {
        let mut me = MediaEngine::default();
        me.register_codec(vp8(), RtpCodecKind::Video)
            .map_err(|e| LoadError::WebRtc(e.to_string()))?;
        me.register_codec(opus(), RtpCodecKind::Audio)
            .map_err(|e| LoadError::WebRtc(e.to_string()))?;
        let registry = if t.interceptors {
            webrtc::peer_connection::register_default_interceptors(
                InterceptorRegistry::new(),
                &mut me,
            )
            .map_err(|e| LoadError::WebRtc(e.to_string()))?
        } else {
            InterceptorRegistry::new()
        };
        let se = SettingEngineBuilder::new()
            .with_multicast_dns_mode(rtc::ice::mdns::MulticastDnsMode::Disabled)
            .build();
        let (tx, rx) = mpsc::channel(16);
        let pc = PeerConnectionBuilder::new()
            .with_configuration(RTCConfigurationBuilder::new().build())
            .with_media_engine(me)
            .with_setting_engine(se)
            .with_interceptor_registry(registry)
            .with_handler(Arc::new(Handler {
                events: tx,
                reg: reg.clone(),
                first_media: first_media.clone(),
            }))
            .with_udp_addrs(vec![format!("{}:0", t.bind_ip)])
            .build()
            .await
            .map_err(|e| LoadError::WebRtc(format!("peer connection: {e}")))?;
        Ok(Self {
            pc: Arc::new(pc),
            events: rx,
            gathered: false,
            connected: false,
        })
    }

    /// Drains pending events without waiting.
    pub(crate) fn poll_events(&mut self) -> Result<(), LoadError> {
        while let Ok(ev) = self.events.try_recv() {
            self.apply(ev)?;
        }
        Ok(())
    }

    pub(crate) fn apply(&mut self, ev: PcEvent) -> Result<(), LoadError> {
        if debug_enabled() {
            if let PcEvent::State(st) = &ev {
                eprintln!("pc state {st}");
            }
        }
        match ev {
            PcEvent::Gathered => self.gathered = true,
            PcEvent::State(RTCPeerConnectionState::Connected) => self.connected = true,
            PcEvent::State(RTCPeerConnectionState::Failed) => {
                return Err(LoadError::WebRtc("peer connection failed".into()))
            }
            PcEvent::State(_) => {}
        }
        Ok(())
    }

    /// Sets `desc` as local description and returns the SDP with candidates (waits for host
    /// candidate gathering the first time: no trickle).
    pub(crate) async fn local_sdp(
        &mut self,
        desc: RTCSessionDescription,
    ) -> Result<String, LoadError> {
        self.pc
            .set_local_description(desc)
            .await
            .map_err(|e| LoadError::WebRtc(format!("set_local_description: {e}")))?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        self.poll_events()?;
        while !self.gathered {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(ev)) => self.apply(ev)?,
                Ok(None) => break,
                Err(_) => break, // send what we have; host candidates come first
            }
        }
        let sdp = self
            .pc
            .local_description()
            .await
            .map(|d| d.sdp)
            .ok_or_else(|| LoadError::WebRtc("no local description".into()))?;
        if debug_enabled() {
            eprintln!("local sdp (gathered: {}):\n{sdp}", self.gathered);
        }
        Ok(sdp)
    }
}

/// `ARBOR_LOAD_DEBUG=1` prints signal messages and peer-connection states.
pub(crate) fn debug_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("ARBOR_LOAD_DEBUG").is_some())
}

fn token(t: &Target, s: &Spec) -> Result<String, LoadError> {
    use livekit_api::access_token::{AccessToken, VideoGrants};
    AccessToken::with_api_key(&t.api_key, &t.api_secret)
        .with_identity(&s.identity)
        .with_name(&s.identity)
        .with_grants(VideoGrants {
            room_join: true,
            room: s.room.clone(),
            can_publish: Some(s.publish),
            can_subscribe: Some(s.subscribe),
            can_publish_data: Some(false),
            ..Default::default()
        })
        .to_jwt()
        .map_err(|e| LoadError::Signal(format!("token: {e}")))
}

fn req(m: proto::signal_request::Message) -> proto::SignalRequest {
    proto::SignalRequest { message: Some(m) }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Runs one participant until `stop` becomes true (then it sends `leave` and closes), or until
/// the server ends it. Join time (see [`Spec::expect_media`]) and failures go to `reg`.
pub async fn run(
    t: Target,
    s: Spec,
    clip: Clip,
    reg: Arc<Registry>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), LoadError> {
    let started = Instant::now();
    let first_media = Arc::new(Notify::new());

    // Signalling.
    let url = format!(
        "{}/rtc?sdk=rust&version=0.1.0&protocol=16&auto_subscribe={}&adaptive_stream=0",
        t.ws_url.trim_end_matches('/'),
        if s.subscribe { 1 } else { 0 }
    );
    let mut request = url
        .into_client_request()
        .map_err(|e| LoadError::Signal(format!("url: {e}")))?;
    let bearer = format!("Bearer {}", token(&t, &s)?);
    request.headers_mut().insert(
        "Authorization",
        bearer
            .parse()
            .map_err(|_| LoadError::Signal("token is not a valid header".into()))?,
    );
    let (ws, _) = tokio::time::timeout(JOIN_TIMEOUT, tokio_tungstenite::connect_async(request))
        .await
        .map_err(|_| LoadError::Signal("connect timed out".into()))?
        .map_err(|e| LoadError::Signal(format!("connect: {e}")))?;
    let (mut sink, mut stream) = ws.split();
    let (out_tx, mut out_rx) = mpsc::channel::<proto::SignalRequest>(SIGNAL_QUEUE);
    let writer = tokio::spawn(async move {
        while let Some(m) = out_rx.recv().await {
            if sink
                .send(WsMessage::Binary(m.encode_to_vec().into()))
                .await
                .is_err()
            {
                break;
            }
        }
        let _ = sink.close().await;
    });
    let send = |m: proto::signal_request::Message| {
        let tx = out_tx.clone();
        async move {
            tx.send(req(m))
                .await
                .map_err(|_| LoadError::Signal("signal connection closed".into()))
        }
    };

    let mut sub: Option<Pc> = None;
    let mut publ: Option<Pc> = None;
    let mut pub_tracks: Vec<(
        Arc<TrackLocalStaticSample>,
        Arc<dyn webrtc::rtp_transceiver::RtpTransceiver>,
        bool,
    )> = Vec::new();
    let mut media_tasks: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    let mut joined = false;
    let mut got_join = false;
    let mut got_media = false;
    let mut ping = tokio::time::interval(PING_INTERVAL);
    let join_deadline = tokio::time::Instant::now() + JOIN_TIMEOUT;

    let result: Result<(), LoadError> = async {
        loop {
            // Joined?
            if !joined {
                let pub_ok = !s.publish || publ.as_ref().is_some_and(|p| p.connected);
                let media_ok = !s.expect_media || got_media;
                if got_join && pub_ok && media_ok {
                    joined = true;
                    reg.join_time(started.elapsed());
                }
            }
            // Start publishing once the publisher PC is up.
            if let Some(p) = publ.as_mut() {
                p.poll_events()?;
                if p.connected && media_tasks.is_empty() && !pub_tracks.is_empty() {
                    for (track, tr, video) in &pub_tracks {
                        media_tasks.push(start_sender(track.clone(), tr.clone(), *video, clip.clone()).await?);
                    }
                }
            }
            if let Some(p) = sub.as_mut() {
                p.poll_events()?;
            }
            tokio::select! {
                _ = stop.changed() => {
                    if *stop.borrow() { return Ok(()); }
                }
                _ = first_media.notified(), if !got_media => { got_media = true; }
                _ = tokio::time::sleep_until(join_deadline), if !joined => {
                    return Err(LoadError::Join(format!(
                        "not joined after {JOIN_TIMEOUT:?} (join response: {got_join}, media: {got_media})")));
                }
                _ = ping.tick() => {
                    send(proto::signal_request::Message::Ping(now_ms())).await?;
                    send(proto::signal_request::Message::PingReq(proto::Ping { timestamp: now_ms(), rtt: 0 })).await?;
                }
                ev = async { match publ.as_mut() { Some(p) => p.events.recv().await, None => std::future::pending().await } } => {
                    if let (Some(p), Some(ev)) = (publ.as_mut(), ev) { p.apply(ev)?; }
                }
                ev = async { match sub.as_mut() { Some(p) => p.events.recv().await, None => std::future::pending().await } } => {
                    if let (Some(p), Some(ev)) = (sub.as_mut(), ev) { p.apply(ev)?; }
                }
                msg = stream.next() => {
                    let bytes = match msg {
                        None => return Err(LoadError::Signal("server closed the signal connection".into())),
                        Some(Err(e)) => return Err(LoadError::Signal(format!("signal: {e}"))),
                        Some(Ok(WsMessage::Binary(b))) => b,
                        Some(Ok(WsMessage::Close(c))) => return Err(LoadError::Signal(format!("server closed: {c:?}"))),
                        Some(Ok(_)) => continue,
                    };
                    let resp = proto::SignalResponse::decode(bytes.as_ref())
                        .map_err(|e| LoadError::Signal(format!("bad frame: {e}")))?;
                    use proto::signal_response::Message as M;
                    if debug_enabled() {
                        eprintln!("[{}] <- {:?}", s.identity, resp.message.as_ref().map(|m| format!("{m:?}").chars().take(300).collect::<String>()));
                    }
                    match resp.message {
                        Some(M::Join(_)) => {
                            got_join = true;
                            if s.subscribe {
                                sub = Some(Pc::new(&t, &reg, &first_media).await?);
                            }
                            if s.publish {
                                let p = Pc::new(&t, &reg, &first_media).await?;
                                let (tracks, reqs) = add_tracks(&p, &s).await?;
                                pub_tracks = tracks;
                                for r in reqs {
                                    send(proto::signal_request::Message::AddTrack(r)).await?;
                                }
                                let offer = p.pc.create_offer(None).await
                                    .map_err(|e| LoadError::WebRtc(format!("create_offer: {e}")))?;
                                let mut p = p;
                                let sdp = p.local_sdp(offer).await?;
                                send(proto::signal_request::Message::Offer(proto::SessionDescription {
                                    r#type: "offer".into(), sdp, id: 1, ..Default::default()
                                })).await?;
                                publ = Some(p);
                            }
                        }
                        Some(M::Answer(sd)) => {
                            if debug_enabled() {
                                eprintln!("answer sdp:\n{}", sd.sdp);
                            }
                            if let Some(p) = publ.as_mut() {
                                let d = RTCSessionDescription::answer(sd.sdp)
                                    .map_err(|e| LoadError::WebRtc(format!("answer: {e}")))?;
                                p.pc.set_remote_description(d).await
                                    .map_err(|e| LoadError::WebRtc(format!("set_remote_description(answer): {e}")))?;
                            }
                        }
                        Some(M::Offer(sd)) => {
                            let Some(p) = sub.as_mut() else { continue };
                            let d = RTCSessionDescription::offer(sd.sdp)
                                .map_err(|e| LoadError::WebRtc(format!("offer: {e}")))?;
                            p.pc.set_remote_description(d).await
                                .map_err(|e| LoadError::WebRtc(format!("set_remote_description(offer): {e}")))?;
                            let answer = p.pc.create_answer(None).await
                                .map_err(|e| LoadError::WebRtc(format!("create_answer: {e}")))?;
                            let sdp = p.local_sdp(answer).await?;
                            send(proto::signal_request::Message::Answer(proto::SessionDescription {
                                r#type: "answer".into(), sdp, id: sd.id, ..Default::default()
                            })).await?;
                        }
                        Some(M::Trickle(tr)) => {
                            let pc = if tr.target == proto::SignalTarget::Subscriber as i32 { sub.as_ref() } else { publ.as_ref() };
                            if let (Some(p), Ok(c)) = (pc, serde_json::from_str::<RTCIceCandidateInit>(&tr.candidate_init)) {
                                let _ = p.pc.add_ice_candidate(c).await;
                            }
                        }
                        Some(M::Leave(l)) => {
                            return Err(LoadError::Signal(format!("server sent leave (reason {})", l.reason)));
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    .await;

    // Leave politely, then tear down.
    let _ = out_tx.try_send(req(proto::signal_request::Message::Leave(
        proto::LeaveRequest {
            can_reconnect: false,
            reason: proto::DisconnectReason::ClientInitiated as i32,
            action: proto::leave_request::Action::Disconnect as i32,
            ..Default::default()
        },
    )));
    drop(out_tx);
    for m in media_tasks {
        m.abort();
    }
    if let Some(p) = publ {
        let _ = p.pc.close().await;
    }
    if let Some(p) = sub {
        let _ = p.pc.close().await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    if result.is_err() && !joined {
        reg.join_failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    result
}

pub(crate) type Transceiver = Arc<dyn webrtc::rtp_transceiver::RtpTransceiver>;

/// Adds a sendonly VP8 and a sendonly Opus transceiver and announces both with `add_track`
/// (cid = the local track id, which is what the SDP's `a=msid` carries).
pub(crate) async fn add_tracks(
    p: &Pc,
    s: &Spec,
) -> Result<
    (
        Vec<(Arc<TrackLocalStaticSample>, Transceiver, bool)>,
        Vec<proto::AddTrackRequest>,
    ),
    LoadError,
> {
    let mut reqs = Vec::new();
    let mut out = Vec::new();
    for (video, codec) in [(true, vp8()), (false, opus())] {
        let kind = if video {
            RtpCodecKind::Video
        } else {
            RtpCodecKind::Audio
        };
        let cid = format!("{}-{}", s.identity, if video { "cam" } else { "mic" });
        let track = Arc::new(
            TrackLocalStaticSample::new(
                Instant::now(),
                MediaStreamTrack::new(
                    format!("{}-stream", s.identity),
                    cid.clone(),
                    cid.clone(),
                    kind,
                    vec![RTCRtpEncodingParameters {
                        rtp_coding_parameters: RTCRtpCodingParameters {
                            ssrc: Some(rand::random::<u32>()),
                            ..Default::default()
                        },
                        active: true,
                        codec: codec.rtp_codec.clone(),
                        ..Default::default()
                    }],
                ),
            )
            .map_err(|e| LoadError::WebRtc(format!("track: {e}")))?,
        );
        let tr =
            p.pc.add_transceiver_from_track(
                track.clone() as Arc<dyn TrackLocal>,
                Some(RTCRtpTransceiverInit {
                    direction: RTCRtpTransceiverDirection::Sendonly,
                    streams: vec![],
                    send_encodings: vec![],
                }),
            )
            .await
            .map_err(|e| LoadError::WebRtc(format!("add_transceiver: {e}")))?;
        reqs.push(proto::AddTrackRequest {
            cid,
            name: if video {
                "camera".into()
            } else {
                "microphone".into()
            },
            r#type: if video {
                proto::TrackType::Video
            } else {
                proto::TrackType::Audio
            } as i32,
            width: if video { 640 } else { 0 },
            height: if video { 360 } else { 0 },
            source: if video {
                proto::TrackSource::Camera
            } else {
                proto::TrackSource::Microphone
            } as i32,
            disable_red: true,
            ..Default::default()
        });
        out.push((track, tr, video));
    }
    Ok((out, reqs))
}

/// Loops the clip into one track at its natural rate until aborted.
pub(crate) async fn start_sender(
    track: Arc<TrackLocalStaticSample>,
    tr: Transceiver,
    video: bool,
    clip: Clip,
) -> Result<tokio::task::JoinHandle<()>, LoadError> {
    let sender = tr
        .sender()
        .await
        .ok()
        .flatten()
        .ok_or_else(|| LoadError::WebRtc("transceiver has no sender".into()))?;
    let pt = sender
        .get_parameters()
        .await
        .map_err(|e| LoadError::WebRtc(format!("sender parameters: {e}")))?
        .rtp_parameters
        .codecs
        .first()
        .map(|c| c.payload_type)
        .ok_or_else(|| LoadError::WebRtc("no negotiated codec".into()))?;
    let ssrc = *track
        .ssrcs()
        .await
        .first()
        .ok_or_else(|| LoadError::WebRtc("track has no ssrc".into()))?;
    let (frames, every) = if video {
        (clip.video.clone(), clip.frame_interval)
    } else {
        (clip.audio.clone(), clip.audio_interval)
    };
    Ok(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut i = 0usize;
        loop {
            tick.tick().await;
            let data = frames[i % frames.len()].clone();
            i = i.wrapping_add(1);
            let sample = Sample {
                data,
                duration: every,
                ..Sample::new(Instant::now())
            };
            if track
                .sample_writer(ssrc, pt)
                .write_sample(&sample)
                .await
                .is_err()
            {
                break;
            }
        }
    }))
}
