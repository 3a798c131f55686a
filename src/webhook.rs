//! Webhook delivery: every room event, POSTed to every configured URL, in order, signed.
//!
//! Rooms emit `WebhookEvent`s into an [`EventSink`] (one bounded queue per URL, `try_send`, see
//! `arbor_actors::events`). Here one task per URL drains its queue:
//!
//! * [`Outbox`] is the sans-IO core: a bounded FIFO with per-event retry state. It decides what
//!   to send next and when, given `now` and the result of the last attempt. Events leave it in
//!   order; an event that fails `webhook.max_attempts` times is dropped, and so is a new event
//!   that finds the outbox full. Every drop is counted and reported to the receiver as
//!   `num_dropped` on the next event it does get (as LiveKit does).
//! * [`run_lane`] is the shell: it feeds the outbox from the queue, performs the HTTP POSTs
//!   (hyper, one connection per attempt, bounded by `webhook.request_timeout_ms`) and sleeps
//!   until the next retry. It keeps draining the queue while a POST is in flight, so a stalled
//!   receiver fills only its own outbox.
//!
//! Each POST carries the protojson body, `Content-Type: application/webhook+json`, and an
//! `Authorization` header holding a JWT signed with the webhook API key whose `sha256` claim
//! is the base64 SHA-256 of the body (what `livekit-api`'s `WebhookReceiver` verifies).

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use base64::Engine as _;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use livekit_api::access_token::AccessToken;
use livekit_protocol as lk;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use arbor_actors::events::{EventLane, EventSink};
use arbor_actors::metrics::METRICS;

/// Longest delay between two attempts at one event.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Validity of the signature JWT (LiveKit uses 5 minutes).
const SIGNATURE_TTL: Duration = Duration::from_secs(300);

/// Delivery settings (from `webhook.*`).
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    pub urls: Vec<String>,
    pub api_key: String,
    pub api_secret: String,
    pub queue_size: usize,
    pub max_attempts: u32,
    pub request_timeout: Duration,
    pub retry_backoff: Duration,
}

/// A parsed `http://host[:port][/path]` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

/// Parse an `http://` URL (no TLS; see `webhook.urls` in the sample config).
pub fn parse_http_url(url: &str) -> Option<HttpUrl> {
    let rest = url.strip_prefix("http://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => 80,
            None => return None,
        };
        (h.to_string(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().ok()?),
            None => (authority.to_string(), 80),
        }
    };
    if host.is_empty() || port == 0 {
        return None;
    }
    Some(HttpUrl {
        host,
        port,
        path: path.to_string(),
    })
}

/// What the delivery shell should do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// POST this event (its `num_dropped` is filled in).
    Send(Box<lk::WebhookEvent>),
    /// Nothing may be sent before this instant (retry backoff).
    WaitUntil(Instant),
    /// The outbox is empty (or an attempt is in flight).
    Idle,
}

/// The sans-IO delivery queue of one URL. See the module documentation.
#[derive(Debug)]
pub struct Outbox {
    queue: VecDeque<lk::WebhookEvent>,
    capacity: usize,
    max_attempts: u32,
    backoff: Duration,
    /// Failed attempts of the head event.
    attempts: u32,
    not_before: Option<Instant>,
    in_flight: bool,
    /// Dropped events not yet reported to the receiver.
    unreported_drops: u64,
    /// The drop count carried by the event in flight.
    reporting: u64,
}

impl Outbox {
    pub fn new(capacity: usize, max_attempts: u32, backoff: Duration) -> Outbox {
        Outbox {
            queue: VecDeque::with_capacity(capacity.min(1024)),
            capacity: capacity.max(1),
            max_attempts: max_attempts.max(1),
            backoff,
            attempts: 0,
            not_before: None,
            in_flight: false,
            unreported_drops: 0,
            reporting: 0,
        }
    }

    /// Events waiting (including one in flight).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Queue an event; a full outbox drops it (counted). Returns whether it was queued.
    pub fn push(&mut self, ev: lk::WebhookEvent) -> bool {
        if self.queue.len() >= self.capacity {
            self.drop_one();
            return false;
        }
        self.queue.push_back(ev);
        METRICS.webhook_pending.fetch_add(1, Relaxed);
        true
    }

    /// Events lost before they reached the outbox (the producer's queue was full).
    pub fn add_lost(&mut self, n: u64) {
        self.unreported_drops += n;
    }

    fn drop_one(&mut self) {
        self.unreported_drops += 1;
        METRICS.webhook_dropped.fetch_add(1, Relaxed);
    }

    fn pop(&mut self) {
        if self.queue.pop_front().is_some() {
            METRICS.webhook_pending.fetch_sub(1, Relaxed);
        }
        self.attempts = 0;
        self.not_before = None;
    }

    /// What to do at `now`.
    pub fn poll(&mut self, now: Instant) -> Next {
        if self.in_flight {
            return Next::Idle;
        }
        let Some(head) = self.queue.front() else {
            return Next::Idle;
        };
        if let Some(t) = self.not_before {
            if t > now {
                return Next::WaitUntil(t);
            }
        }
        let mut ev = head.clone();
        self.reporting = self.unreported_drops;
        #[allow(deprecated)]
        {
            ev.num_dropped = self.reporting.min(i32::MAX as u64) as i32;
        }
        self.in_flight = true;
        Next::Send(Box::new(ev))
    }

    /// The outcome of the attempt started by the last [`Next::Send`].
    pub fn on_result(&mut self, now: Instant, delivered: bool) {
        if !self.in_flight {
            return;
        }
        self.in_flight = false;
        if delivered {
            METRICS.webhook_delivered.fetch_add(1, Relaxed);
            self.unreported_drops -= self.reporting.min(self.unreported_drops);
            self.reporting = 0;
            self.pop();
            return;
        }
        METRICS.webhook_failed_attempts.fetch_add(1, Relaxed);
        self.attempts += 1;
        if self.attempts >= self.max_attempts {
            self.pop();
            self.drop_one();
        } else {
            let exp = self
                .backoff
                .saturating_mul(1 << (self.attempts - 1).min(16));
            self.not_before = Some(now + exp.min(MAX_BACKOFF));
        }
    }
}

/// Start one delivery task per URL; returns the sink rooms emit into.
pub fn start(settings: WebhookSettings) -> EventSink {
    if settings.urls.is_empty() {
        return EventSink::default();
    }
    let (sink, lanes) = EventSink::new(settings.urls.len(), settings.queue_size);
    for (url, lane) in settings.urls.iter().zip(lanes) {
        let Some(target) = parse_http_url(url) else {
            // Rejected by config validation already; never reached with a validated config.
            tracing::error!(%url, "invalid webhook URL; events for it are dropped");
            continue;
        };
        tracing::info!(%url, "webhook receiver configured");
        tokio::spawn(run_lane(lane, target, url.clone(), settings.clone()));
    }
    sink
}

/// The signature header for a body.
pub fn sign(api_key: &str, api_secret: &str, body: &[u8]) -> Result<String, String> {
    let digest = Sha256::digest(body);
    let hash = base64::engine::general_purpose::STANDARD.encode(digest);
    AccessToken::with_api_key(api_key, api_secret)
        .with_sha256(&hash)
        .with_ttl(SIGNATURE_TTL)
        .to_jwt()
        .map_err(|e| e.to_string())
}

/// Deliver one URL's events until the sink is dropped and the outbox is empty.
async fn run_lane(mut lane: EventLane, target: HttpUrl, url: String, s: WebhookSettings) {
    let span = tracing::info_span!("webhook", %url);
    let mut outbox = Outbox::new(s.queue_size, s.max_attempts, s.retry_backoff);
    let mut closed = false;
    loop {
        outbox.add_lost(lane.lost.swap(0, Relaxed));
        match outbox.poll(Instant::now()) {
            Next::Send(ev) => {
                let result = match serde_json::to_vec(&ev) {
                    Ok(body) => match sign(&s.api_key, &s.api_secret, &body) {
                        Ok(auth) => {
                            let post = post(&target, body, auth, s.request_timeout);
                            tokio::pin!(post);
                            loop {
                                tokio::select! {
                                    r = &mut post => break r,
                                    m = lane.rx.recv(), if !closed => match m {
                                        Some(e) => { outbox.push(e); }
                                        None => closed = true,
                                    },
                                }
                            }
                        }
                        Err(e) => Err(format!("signing: {e}")),
                    },
                    Err(e) => Err(format!("encoding: {e}")),
                };
                if let Err(e) = &result {
                    tracing::warn!(parent: &span, event = %ev.event, id = %ev.id, error = %e, "webhook delivery failed");
                } else {
                    tracing::debug!(parent: &span, event = %ev.event, id = %ev.id, "webhook delivered");
                }
                outbox.on_result(Instant::now(), result.is_ok());
            }
            Next::WaitUntil(t) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(t) => {}
                    m = lane.rx.recv(), if !closed => match m {
                        Some(e) => { outbox.push(e); }
                        None => closed = true,
                    },
                }
            }
            Next::Idle => {
                if closed {
                    return;
                }
                match lane.rx.recv().await {
                    Some(e) => {
                        outbox.push(e);
                    }
                    None => closed = true,
                }
            }
        }
    }
}

/// One POST; Ok on a 2xx answer within `timeout`.
async fn post(
    target: &HttpUrl,
    body: Vec<u8>,
    auth: String,
    timeout: Duration,
) -> Result<(), String> {
    let attempt = async {
        let stream = tokio::net::TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let host = if target.host.contains(':') {
            format!("[{}]:{}", target.host, target.port)
        } else {
            format!("{}:{}", target.host, target.port)
        };
        let req = hyper::Request::post(target.path.as_str())
            .header(hyper::header::HOST, host)
            .header(hyper::header::CONTENT_TYPE, "application/webhook+json")
            .header(hyper::header::AUTHORIZATION, auth)
            .header(hyper::header::USER_AGENT, "LiveKit (Arbor)")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| format!("request: {e}"))?;
        // Drive the connection and the request together; both end with this future.
        tokio::pin!(conn);
        let resp = tokio::select! {
            r = sender.send_request(req) => r.map_err(|e| format!("request: {e}"))?,
            r = &mut conn => return Err(format!("connection closed early: {r:?}")),
        };
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(format!("receiver answered {}", resp.status()))
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(name: &str) -> lk::WebhookEvent {
        lk::WebhookEvent {
            event: name.into(),
            id: name.into(),
            ..Default::default()
        }
    }

    #[test]
    fn urls_parse() {
        assert_eq!(
            parse_http_url("http://127.0.0.1:8080/hook?x=1"),
            Some(HttpUrl {
                host: "127.0.0.1".into(),
                port: 8080,
                path: "/hook?x=1".into()
            })
        );
        assert_eq!(parse_http_url("http://h").unwrap().port, 80);
        assert_eq!(parse_http_url("http://h").unwrap().path, "/");
        assert_eq!(parse_http_url("http://[::1]:9/a").unwrap().host, "::1");
        assert!(parse_http_url("https://h/").is_none());
        assert!(parse_http_url("http://:80/").is_none());
        assert!(parse_http_url("http://h:x/").is_none());
        assert!(parse_http_url("http://u@h/").is_none());
    }

    #[test]
    fn in_order_one_at_a_time() {
        let t0 = Instant::now();
        let mut o = Outbox::new(10, 3, Duration::from_millis(100));
        o.push(ev("a"));
        o.push(ev("b"));
        let Next::Send(e) = o.poll(t0) else { panic!() };
        assert_eq!(e.event, "a");
        // Nothing else while "a" is in flight.
        assert_eq!(o.poll(t0), Next::Idle);
        o.on_result(t0, true);
        let Next::Send(e) = o.poll(t0) else { panic!() };
        assert_eq!(e.event, "b");
        o.on_result(t0, true);
        assert_eq!(o.poll(t0), Next::Idle);
        assert_eq!(o.len(), 0);
    }

    #[test]
    fn retries_back_off_then_drop_and_report() {
        let t0 = Instant::now();
        let mut o = Outbox::new(10, 3, Duration::from_millis(100));
        o.push(ev("a"));
        o.push(ev("b"));
        assert!(matches!(o.poll(t0), Next::Send(_)));
        o.on_result(t0, false);
        assert_eq!(o.poll(t0), Next::WaitUntil(t0 + Duration::from_millis(100)));
        let t1 = t0 + Duration::from_millis(100);
        assert!(matches!(o.poll(t1), Next::Send(_)));
        o.on_result(t1, false);
        assert_eq!(o.poll(t1), Next::WaitUntil(t1 + Duration::from_millis(200)));
        let t2 = t1 + Duration::from_millis(200);
        let Next::Send(e) = o.poll(t2) else { panic!() };
        assert_eq!(e.event, "a");
        o.on_result(t2, false); // third failure: "a" is dropped
        let Next::Send(e) = o.poll(t2) else { panic!() };
        assert_eq!(e.event, "b");
        #[allow(deprecated)]
        let n = e.num_dropped;
        assert_eq!(n, 1);
        o.on_result(t2, true);
        o.push(ev("c"));
        let Next::Send(e) = o.poll(t2) else { panic!() };
        #[allow(deprecated)]
        let n = e.num_dropped;
        assert_eq!(n, 0, "drops are reported once");
    }

    #[test]
    fn full_outbox_drops_new_events_and_counts_them() {
        let t0 = Instant::now();
        let mut o = Outbox::new(2, 1, Duration::from_millis(1));
        assert!(o.push(ev("a")));
        assert!(o.push(ev("b")));
        assert!(!o.push(ev("c")));
        o.add_lost(2);
        let Next::Send(e) = o.poll(t0) else { panic!() };
        #[allow(deprecated)]
        let n = e.num_dropped;
        assert_eq!((e.event.as_str(), n), ("a", 3));
        // Drops that happen while "a" is in flight are reported later.
        assert!(!o.push(ev("d")) || o.len() <= 2);
        o.on_result(t0, true);
        let Next::Send(e) = o.poll(t0) else { panic!() };
        assert_eq!(e.event, "b");
        #[allow(deprecated)]
        let n = e.num_dropped;
        assert!(n <= 1);
    }

    #[test]
    fn signature_verifies_with_livekit_api() {
        let body = br#"{"event":"room_started"}"#;
        let jwt = sign("k", "s", body).unwrap();
        let claims = livekit_api::access_token::TokenVerifier::with_api_key("k", "s")
            .verify(&jwt)
            .unwrap();
        let want = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(body));
        assert_eq!(claims.sha256, want);
        let receiver = livekit_api::webhooks::WebhookReceiver::new(
            livekit_api::access_token::TokenVerifier::with_api_key("k", "s"),
        );
        let ev = receiver
            .receive(std::str::from_utf8(body).unwrap(), &jwt)
            .unwrap();
        assert_eq!(ev.event, "room_started");
        assert!(receiver.receive(r#"{"event":"x"}"#, &jwt).is_err());
    }
}
