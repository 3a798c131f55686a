//! One client's signal WebSocket: decode `SignalRequest`s (binary protobuf, or protojson when
//! the client sends text), hand them to the participant actor, and write its responses back.
//!
//! Garbage is answered with a WebSocket close frame that says what was wrong (code 1007, or
//! 1009 for an oversized message); the participant then leaves, and the room lives on.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::{SinkExt, StreamExt};
use livekit_protocol as lk;
use tokio::sync::{mpsc, oneshot};

use arbor_actors::codec;
use arbor_actors::metrics::METRICS;
use arbor_actors::participant::{Participant, ParticipantInit, SignalIn, SocketClosed};
use arbor_actors::room::{GetSpan, Room};

use crate::http::AppState;

/// What the token and query string say about the joining participant.
#[derive(Debug, Clone)]
pub struct JoinParams {
    pub identity: String,
    pub name: String,
    pub metadata: String,
    pub attributes: HashMap<String, String>,
    pub permission: lk::ParticipantPermission,
    pub kind: i32,
    pub auto_subscribe: bool,
    pub protocol: i32,
    pub client_protocol: i32,
    pub room_name: String,
}

/// A token bucket: `rate` tokens per second, at most `burst` saved up. Sans-IO: the caller
/// passes the time.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: std::time::Instant,
}

impl TokenBucket {
    /// A full bucket. `rate` 0 means unlimited.
    pub fn new(rate: u32, burst: u32, now: std::time::Instant) -> Self {
        TokenBucket {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            last: now,
        }
    }

    /// Take one token if there is one.
    pub fn allow(&mut self, now: std::time::Instant) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// How often the server pings the client's WebSocket.
const WS_PING_INTERVAL: Duration = Duration::from_secs(10);

/// Decode one WebSocket message into a signal request (`None` for control frames).
pub fn decode(msg: &Message, json: &AtomicBool) -> Result<Option<lk::SignalRequest>, String> {
    match msg {
        Message::Binary(b) => codec::decode_signal_binary(b.as_ref())
            .map(Some)
            .map_err(|e| e.to_string()),
        Message::Text(t) => {
            json.store(true, Ordering::Relaxed);
            codec::decode_signal_text(t.as_str())
                .map(Some)
                .map_err(|e| e.to_string())
        }
        _ => Ok(None),
    }
}

/// Encode one response, as protobuf or (if the client spoke JSON) protojson text.
pub fn encode(msg: lk::signal_response::Message, json: bool) -> Message {
    match codec::encode_signal(msg, json) {
        Ok(text) => Message::Text(text.into()),
        Err(bytes) => Message::Binary(bytes.into()),
    }
}

/// Answers a resume (`reconnect=1`) of a session this node does not hold, as LiveKit does: a
/// `LeaveRequest` with action `RECONNECT` (and `can_reconnect` for clients older than protocol
/// 13), reason `STATE_MISMATCH`, then a normal close. The client's SDK falls back to a full
/// rejoin.
pub async fn refuse_resume(mut socket: WebSocket) {
    let leave = lk::signal_response::Message::Leave(lk::LeaveRequest {
        can_reconnect: true,
        reason: lk::DisconnectReason::StateMismatch as i32,
        action: lk::leave_request::Action::Reconnect as i32,
        regions: None,
    });
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = socket.send(encode(leave, false)).await;
        let _ = socket
            .send(Message::Close(Some(CloseFrame {
                code: 1000,
                reason: "unknown session: rejoin".into(),
            })))
            .await;
    })
    .await;
}

/// Run one signal session until either side ends it.
pub async fn session(socket: WebSocket, state: AppState, params: JoinParams, room: Addr<Room>) {
    let room_span = room
        .send(GetSpan)
        .await
        .unwrap_or_else(|_| tracing::Span::none());
    let (signal_tx, mut signal_rx) = mpsc::channel(state.settings.signal_queue);
    let init = ParticipantInit {
        identity: params.identity.clone(),
        name: params.name,
        metadata: params.metadata,
        attributes: params.attributes,
        permission: params.permission,
        kind: params.kind,
        auto_subscribe: params.auto_subscribe,
        protocol: params.protocol,
        client_protocol: params.client_protocol,
        room,
        room_span,
        media: state.media.for_room(&params.room_name),
        settings: state.settings.clone(),
        signal_tx,
    };
    let (participant, sid) = Participant::start_session(init, &state.arbiter);
    tracing::debug!(participant = %sid, room = %params.room_name, "signal session started");
    let (mut ws_tx, mut ws_rx) = socket.split();
    let json = Arc::new(AtomicBool::new(false));
    let (close_tx, mut close_rx) = oneshot::channel::<(u16, String)>();

    // Writer: responses from the participant, periodic pings, and the final close frame.
    let json_w = json.clone();
    let mut writer = tokio::spawn(async move {
        let mut ping = tokio::time::interval(WS_PING_INTERVAL);
        ping.tick().await;
        loop {
            // A close with a reason wins over queued responses, so the client learns why.
            tokio::select! {
                biased;
                c = &mut close_rx => {
                    if let Ok((code, reason)) = c {
                        let _ = ws_tx.send(Message::Close(Some(CloseFrame { code, reason: reason.into() }))).await;
                    }
                    return;
                }
                m = signal_rx.recv() => match m {
                    Some(m) => {
                        if ws_tx.send(encode(m, json_w.load(Ordering::Relaxed))).await.is_err() {
                            return;
                        }
                    }
                    None => {
                        let _ = ws_tx.send(Message::Close(Some(CloseFrame { code: 1000, reason: "session ended".into() }))).await;
                        return;
                    }
                },
                _ = ping.tick() => {
                    if ws_tx.send(Message::Ping(Vec::new().into())).await.is_err() {
                        return;
                    }
                }
            }
        }
    });

    // Reader: client messages, bounded by the ping timeout.
    let timeout = Duration::from_secs(u64::from(state.settings.ping_timeout) + 5);
    let mut clean = false;
    let mut close_tx = Some(close_tx);
    let mut writer_done = false;
    let mut bucket = TokenBucket::new(
        state.signal_rate,
        state.signal_burst,
        std::time::Instant::now(),
    );
    loop {
        let next = tokio::select! {
            n = tokio::time::timeout(timeout, ws_rx.next()) => n,
            _ = &mut writer => {
                writer_done = true;
                break;
            }
        };
        let msg = match next {
            Err(_) => {
                tracing::info!(participant = %sid, "signal timeout: no message within ping timeout");
                break;
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                METRICS.inc_signal_errors();
                let text = e.to_string();
                let code = if text.contains("too long")
                    || text.contains("too big")
                    || text.contains("size")
                {
                    1009
                } else {
                    1002
                };
                tracing::info!(participant = %sid, error = %text, "signal socket error");
                if let Some(tx) = close_tx.take() {
                    let _ = tx.send((code, format!("signal error: {text}")));
                }
                break;
            }
            Ok(Some(Ok(m))) => m,
        };
        if let Message::Close(_) = msg {
            break;
        }
        match decode(&msg, &json) {
            Ok(Some(req)) => {
                let Some(m) = req.message else { continue };
                if !bucket.allow(std::time::Instant::now()) {
                    METRICS
                        .signal_rate_limited
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let reason = format!(
                        "signal rate limit exceeded (limit.signal_rate = {}/s, limit.signal_burst = {})",
                        state.signal_rate, state.signal_burst
                    );
                    tracing::warn!(participant = %sid, %reason, "disconnecting");
                    if let Some(tx) = close_tx.take() {
                        let _ = tx.send((1008, reason));
                    }
                    break;
                }
                if matches!(m, lk::signal_request::Message::Leave(_)) {
                    clean = true;
                }
                if participant.send(SignalIn(m)).await.is_err() {
                    break;
                }
            }
            Ok(None) => {}
            Err(e) => {
                METRICS.inc_signal_errors();
                tracing::info!(participant = %sid, error = %e, "bad signal message; disconnecting");
                if let Some(tx) = close_tx.take() {
                    let _ = tx.send((1007, e));
                }
                break;
            }
        }
    }
    participant.do_send(SocketClosed { clean });
    // We closed with a reason: finish the closing handshake by reading (and discarding) what
    // the client still sends until its close frame, briefly. Dropping the socket with unread
    // data would make the kernel reset the connection and the client could lose our reason.
    if close_tx.is_none() {
        let drain = async {
            while let Some(Ok(m)) = ws_rx.next().await {
                if matches!(m, Message::Close(_)) {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
    }
    // Let the writer flush a final close frame, but never wait long.
    if !writer_done {
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut writer).await;
        writer.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;
    use rand::{Rng, SeedableRng};

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let json = AtomicBool::new(false);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for n in 0..2000 {
            let len = rng.random_range(0..256);
            let bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            let _ = decode(&Message::Binary(bytes.clone().into()), &json);
            let text = String::from_utf8_lossy(&bytes).to_string();
            let _ = decode(&Message::Text(text.into()), &json);
            if n == 0 {
                assert!(decode(&Message::Text("{".into()), &json).is_err());
            }
        }
        assert!(decode(&Message::Binary(vec![0xff, 0xff, 0xff].into()), &json).is_err());
    }

    #[test]
    fn token_bucket_allows_burst_then_rate() {
        let t0 = std::time::Instant::now();
        let mut b = TokenBucket::new(10, 5, t0);
        let allowed = (0..20).filter(|_| b.allow(t0)).count();
        assert_eq!(allowed, 5);
        // 1 s later: 10 more tokens, capped by the burst of 5.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!((0..20).filter(|_| b.allow(t1)).count(), 5);
        let t2 = t1 + Duration::from_millis(100);
        assert_eq!((0..20).filter(|_| b.allow(t2)).count(), 1);
        let mut unlimited = TokenBucket::new(0, 0, t0);
        assert!((0..10_000).all(|_| unlimited.allow(t0)));
    }

    #[test]
    fn protobuf_and_json_round_trip() {
        let json = AtomicBool::new(false);
        let req = lk::SignalRequest {
            message: Some(lk::signal_request::Message::Ping(42)),
        };
        let got = decode(&Message::Binary(req.encode_to_vec().into()), &json)
            .unwrap()
            .unwrap();
        assert_eq!(got, req);
        assert!(!json.load(Ordering::Relaxed));
        let got = decode(&Message::Text(r#"{"ping":"42"}"#.into()), &json)
            .unwrap()
            .unwrap();
        assert_eq!(got, req);
        assert!(json.load(Ordering::Relaxed));
        // Responses follow the client's encoding.
        match encode(lk::signal_response::Message::Pong(1), true) {
            Message::Text(t) => assert!(t.as_str().contains("pong")),
            other => panic!("expected text, got {other:?}"),
        }
    }
}
