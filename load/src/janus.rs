//! The same participant, speaking Janus' VideoRoom API over its WebSocket transport instead of
//! LiveKit signalling. Media, peer connections and measurements are shared with [`crate::lk`],
//! so the two servers see identical clients.
//!
//! ```text
//!   ws (subprotocol janus-protocol)
//!   ─► create → session            ─► attach videoroom → handle (one publisher, one subscriber)
//!   ─► create room (ignored if it exists)
//!   publisher:  ─► join ptype=publisher   ◄─ joined {publishers}
//!               ─► publish + jsep offer   ◄─ event + jsep answer
//!               ─► trickle {completed: true}   (our SDP already holds the host candidates)
//!   subscriber: ─► join ptype=subscriber streams=[feeds]   ◄─ attached + jsep offer
//!               ─► start + jsep answer                     ─► trickle completed
//!               new feeds later: ─► subscribe streams=[feed] ◄─ updated + jsep offer ─► start
//!   ─► keepalive every 20 s
//! ```
//!
//! Livestream subscribers do not publish: they find the publisher with `listparticipants`.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::{watch, Notify};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use webrtc::peer_connection::RTCSessionDescription;

use crate::clip::Clip;
use crate::lk::{self, Pc, JOIN_TIMEOUT};
use crate::stats::Registry;
use crate::LoadError;

const KEEPALIVE: Duration = Duration::from_secs(20);
/// Publishers allowed per created room (conference rooms hold 8).
const ROOM_PUBLISHERS: u32 = 16;

#[derive(Debug, Clone)]
pub struct Target {
    /// `ws://10.200.0.1:8188`
    pub url: String,
    /// Base VideoRoom room id; a scenario's room name is hashed onto it.
    pub room: u64,
    pub bind_ip: IpAddr,
    pub interceptors: bool,
}

#[derive(Debug, Clone)]
pub struct Spec {
    pub room_key: String,
    pub display: String,
    pub publish: bool,
    pub subscribe: bool,
    pub expect_media: bool,
}

fn room_id(base: u64, key: &str) -> u64 {
    // FNV-1a: stable across runs and processes.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in key.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    base + h % 1_000_000
}

fn err(what: &str, v: &Value) -> LoadError {
    LoadError::Janus(format!("{what}: {}", v))
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A Janus session on one WebSocket: transactions and buffered asynchronous events.
struct Session {
    ws: Ws,
    id: u64,
    next_tx: u64,
    /// Events received while waiting for a transaction's reply.
    pending: Vec<Value>,
}

impl Session {
    async fn connect(url: &str) -> Result<Self, LoadError> {
        let mut req = url
            .into_client_request()
            .map_err(|e| LoadError::Janus(format!("url: {e}")))?;
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            "janus-protocol"
                .parse()
                .map_err(|_| LoadError::Janus("header".into()))?,
        );
        let (ws, _) = tokio::time::timeout(JOIN_TIMEOUT, tokio_tungstenite::connect_async(req))
            .await
            .map_err(|_| LoadError::Janus("connect timed out".into()))?
            .map_err(|e| LoadError::Janus(format!("connect: {e}")))?;
        let mut s = Self {
            ws,
            id: 0,
            next_tx: 1,
            pending: Vec::new(),
        };
        let r = s.call(json!({"janus": "create"})).await?;
        s.id = r["data"]["id"].as_u64().ok_or_else(|| err("create", &r))?;
        Ok(s)
    }

    async fn send(&mut self, mut v: Value) -> Result<String, LoadError> {
        let tx = format!("t{}", self.next_tx);
        self.next_tx += 1;
        v["transaction"] = json!(tx);
        if self.id != 0 {
            v["session_id"] = json!(self.id);
        }
        self.ws
            .send(WsMessage::Text(v.to_string().into()))
            .await
            .map_err(|e| LoadError::Janus(format!("send: {e}")))?;
        Ok(tx)
    }

    async fn recv(&mut self) -> Result<Value, LoadError> {
        loop {
            match self.ws.next().await {
                None => return Err(LoadError::Janus("connection closed".into())),
                Some(Err(e)) => return Err(LoadError::Janus(format!("recv: {e}"))),
                Some(Ok(WsMessage::Text(t))) => {
                    return serde_json::from_str(t.as_str())
                        .map_err(|e| LoadError::Janus(format!("bad JSON: {e}")))
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Sends `v` and waits for its final reply (`success`, `error`, or a plugin `event`),
    /// skipping `ack`s and buffering unrelated messages.
    async fn call(&mut self, v: Value) -> Result<Value, LoadError> {
        let tx = self.send(v).await?;
        let deadline = tokio::time::Instant::now() + JOIN_TIMEOUT;
        loop {
            let m = tokio::time::timeout_at(deadline, self.recv())
                .await
                .map_err(|_| LoadError::Janus("no reply".into()))??;
            if m["transaction"].as_str() == Some(tx.as_str()) {
                match m["janus"].as_str() {
                    Some("ack") => continue,
                    Some("error") => return Err(err("error", &m)),
                    _ => return Ok(m),
                }
            }
            self.pending.push(m);
        }
    }

    async fn attach(&mut self) -> Result<u64, LoadError> {
        let r = self
            .call(json!({"janus": "attach", "plugin": "janus.plugin.videoroom"}))
            .await?;
        r["data"]["id"].as_u64().ok_or_else(|| err("attach", &r))
    }

    async fn message(
        &mut self,
        handle: u64,
        body: Value,
        jsep: Option<Value>,
    ) -> Result<Value, LoadError> {
        let mut v = json!({"janus": "message", "handle_id": handle, "body": body});
        if let Some(j) = jsep {
            v["jsep"] = j;
        }
        let r = self.call(v).await?;
        let data = &r["plugindata"]["data"];
        if data["error_code"].is_number() {
            return Err(err("videoroom", data));
        }
        Ok(r)
    }

    async fn trickle_completed(&mut self, handle: u64) -> Result<(), LoadError> {
        self.send(
            json!({"janus": "trickle", "handle_id": handle, "candidate": {"completed": true}}),
        )
        .await
        .map(|_| ())
    }
}

fn feeds_of(data: &Value) -> Vec<u64> {
    data["publishers"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p["id"].as_u64()).collect())
        .unwrap_or_default()
}

/// Runs one Janus participant until `stop`; see the module docs.
pub async fn run(
    t: Target,
    s: Spec,
    clip: Clip,
    reg: Arc<Registry>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), LoadError> {
    let started = Instant::now();
    let first_media = Arc::new(Notify::new());
    let lt = lk::Target {
        ws_url: String::new(),
        api_key: String::new(),
        api_secret: String::new(),
        bind_ip: t.bind_ip,
        interceptors: t.interceptors,
    };
    let room = room_id(t.room, &s.room_key);
    let mut js = Session::connect(&t.url).await?;
    let mut publ: Option<Pc> = None;
    let mut sub: Option<Pc> = None;
    let mut media = Vec::new();
    let mut pub_tracks = Vec::new();
    let mut known: HashSet<u64> = HashSet::new();
    let mut my_id = 0u64;
    let mut sub_handle: Option<u64> = None;
    let mut sub_joined = false;
    let mut joined = false;

    let result: Result<(), LoadError> = async {
        let control = js.attach().await?;
        // Create the room; "already exists" (427) is fine.
        let _ = js
            .message(
                control,
                json!({"request": "create", "room": room, "publishers": ROOM_PUBLISHERS,
                       "videocodec": "vp8", "audiocodec": "opus", "bitrate": 0}),
                None,
            )
            .await;
        let mut initial_feeds = Vec::new();
        if s.publish {
            let r = js
                .message(control, json!({"request": "join", "ptype": "publisher", "room": room, "display": s.display}), None)
                .await?;
            let data = &r["plugindata"]["data"];
            my_id = data["id"].as_u64().ok_or_else(|| err("join", data))?;
            initial_feeds = feeds_of(data);
            let mut p = Pc::new(&lt, &reg, &first_media).await?;
            let spec = lk::Spec {
                room: s.room_key.clone(),
                identity: s.display.clone(),
                publish: true,
                subscribe: false,
                expect_media: false,
            };
            let (tracks, _) = lk::add_tracks(&p, &spec).await?;
            pub_tracks = tracks;
            let offer = p.pc.create_offer(None).await.map_err(|e| LoadError::WebRtc(e.to_string()))?;
            let sdp = p.local_sdp(offer).await?;
            let r = js
                .message(control, json!({"request": "publish", "audio": true, "video": true}),
                         Some(json!({"type": "offer", "sdp": sdp})))
                .await?;
            let answer = r["jsep"]["sdp"].as_str().ok_or_else(|| err("publish answer", &r))?;
            if lk::debug_enabled() {
                eprintln!("janus answer:\n{answer}");
            }
            p.pc
                .set_remote_description(
                    RTCSessionDescription::answer(answer.to_string()).map_err(|e| LoadError::WebRtc(e.to_string()))?,
                )
                .await
                .map_err(|e| LoadError::WebRtc(e.to_string()))?;
            js.trickle_completed(control).await?;
            publ = Some(p);
        } else if s.subscribe {
            // A pure subscriber finds the publishers of the room.
            let deadline = Instant::now() + JOIN_TIMEOUT;
            while initial_feeds.is_empty() && Instant::now() < deadline {
                let r = js.message(control, json!({"request": "listparticipants", "room": room}), None).await?;
                initial_feeds = r["plugindata"]["data"]["participants"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter(|p| p["publisher"].as_bool() == Some(true))
                            .filter_map(|p| p["id"].as_u64())
                            .collect()
                    })
                    .unwrap_or_default();
                if initial_feeds.is_empty() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        let mut new_feeds: Vec<u64> = initial_feeds.into_iter().filter(|f| *f != my_id).collect();
        let mut keepalive = tokio::time::interval(KEEPALIVE);
        let mut got_media = false;
        let join_deadline = tokio::time::Instant::now() + JOIN_TIMEOUT;
        loop {
            // Subscribe to feeds we learnt about (first join, then `subscribe` updates).
            if s.subscribe && !new_feeds.is_empty() {
                let streams: Vec<Value> = new_feeds
                    .iter()
                    .filter(|f| known.insert(**f))
                    .map(|f| json!({"feed": f}))
                    .collect();
                new_feeds.clear();
                if !streams.is_empty() {
                    let h = match sub_handle {
                        Some(h) => h,
                        None => {
                            let h = js.attach().await?;
                            sub_handle = Some(h);
                            sub = Some(Pc::new(&lt, &reg, &first_media).await?);
                            h
                        }
                    };
                    let body = if sub_joined {
                        json!({"request": "subscribe", "streams": streams})
                    } else {
                        json!({"request": "join", "ptype": "subscriber", "room": room, "streams": streams})
                    };
                    sub_joined = true;
                    let r = js.message(h, body, None).await?;
                    if let (Some(offer), Some(p)) = (r["jsep"]["sdp"].as_str(), sub.as_mut()) {
                        answer_offer(&mut js, h, p, offer).await?;
                    }
                }
            }
            if let Some(p) = publ.as_mut() {
                p.poll_events()?;
                if p.connected && media.is_empty() {
                    for (track, tr, video) in &pub_tracks {
                        media.push(lk::start_sender(track.clone(), tr.clone(), *video, clip.clone()).await?);
                    }
                }
            }
            if let Some(p) = sub.as_mut() {
                p.poll_events()?;
            }
            if !joined {
                let pub_ok = !s.publish || publ.as_ref().is_some_and(|p| p.connected);
                if pub_ok && (!s.expect_media || got_media) {
                    joined = true;
                    reg.join_time(started.elapsed());
                }
            }
            // Handle buffered events first.
            let m = if let Some(m) = js.pending.pop() {
                Some(m)
            } else {
                tokio::select! {
                    _ = stop.changed() => { if *stop.borrow() { return Ok(()) } None }
                    _ = first_media.notified(), if !got_media => { got_media = true; None }
                    _ = tokio::time::sleep_until(join_deadline), if !joined => {
                        return Err(LoadError::Join(format!("not joined after {JOIN_TIMEOUT:?} (media: {got_media})")));
                    }
                    _ = keepalive.tick() => { js.send(json!({"janus": "keepalive"})).await?; None }
                    _ = tokio::time::sleep(Duration::from_millis(200)) => None,
                    m = js.recv() => Some(m?),
                }
            };
            let Some(m) = m else { continue };
            if m["janus"].as_str() != Some("event") {
                continue;
            }
            let data = &m["plugindata"]["data"];
            for f in feeds_of(data) {
                if f != my_id {
                    new_feeds.push(f);
                }
            }
            // Renegotiation offers for the subscriber handle arrive as events too.
            if let (Some(offer), Some(h)) = (m["jsep"]["sdp"].as_str(), sub_handle) {
                if m["sender"].as_u64() == Some(h) && m["jsep"]["type"].as_str() == Some("offer") {
                    if let Some(p) = sub.as_mut() {
                        answer_offer(&mut js, h, p, offer).await?;
                    }
                }
            }
        }
    }
    .await;

    for m in media {
        m.abort();
    }
    if let Some(p) = publ {
        let _ = p.pc.close().await;
    }
    if let Some(p) = sub {
        let _ = p.pc.close().await;
    }
    let _ = js.send(json!({"janus": "destroy"})).await;
    let _ = js.ws.close(None).await;
    if result.is_err() && !joined {
        reg.join_failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    result
}

async fn answer_offer(js: &mut Session, h: u64, p: &mut Pc, offer: &str) -> Result<(), LoadError> {
    p.pc.set_remote_description(
        RTCSessionDescription::offer(offer.to_string())
            .map_err(|e| LoadError::WebRtc(e.to_string()))?,
    )
    .await
    .map_err(|e| LoadError::WebRtc(format!("set_remote_description(offer): {e}")))?;
    let answer =
        p.pc.create_answer(None)
            .await
            .map_err(|e| LoadError::WebRtc(e.to_string()))?;
    let sdp = p.local_sdp(answer).await?;
    js.message(
        h,
        json!({"request": "start"}),
        Some(json!({"type": "answer", "sdp": sdp})),
    )
    .await?;
    js.trickle_completed(h).await
}
