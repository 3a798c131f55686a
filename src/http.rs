//! The HTTP front: health, metrics, `/rtc` signalling and its validate endpoints.

use std::collections::HashMap;
use std::sync::Arc;

use actix::{Addr, ArbiterHandle};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use arbor_actors::config::RoomSettings;
use arbor_actors::manager::{GetRoom, RoomManager};
use arbor_actors::media::MediaPlane;
use arbor_actors::metrics::METRICS;
use arbor_actors::RoomError;

use crate::auth::{Auth, AuthError};
use crate::signal::{self, JoinParams};

/// Shared state of the HTTP handlers.
#[derive(Clone)]
pub struct AppState {
    pub auth: Auth,
    pub manager: Addr<RoomManager>,
    pub media: MediaPlane,
    pub settings: Arc<RoomSettings>,
    pub arbiter: ArbiterHandle,
    pub max_message_bytes: usize,
    /// WebSocket read buffer and write-buffer target per signal connection
    /// (`limit.signal_buffer_bytes`; the library default is 128 KiB each).
    pub ws_buffer_bytes: usize,
    /// Signal messages per second per participant (`limit.signal_rate`, 0 = unlimited).
    pub signal_rate: u32,
    /// Burst of the signal rate limit (`limit.signal_burst`).
    pub signal_burst: u32,
}

/// All routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(|| async { "OK" }))
        .route("/metrics", get(metrics))
        .route("/rtc", get(rtc))
        .route("/rtc/validate", get(validate))
        .route("/rtc/v1", get(not_found))
        .route("/rtc/v1/validate", get(not_found))
        .route(
            "/twirp/livekit.RoomService/{method}",
            post(crate::twirp::handle).options(crate::twirp::preflight),
        )
        .route(
            "/twirp/{*path}",
            post(crate::twirp::bad_route).options(crate::twirp::preflight),
        )
        .with_state(state)
}

fn cors(mut r: Response) -> Response {
    r.headers_mut().insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    r
}

fn error(status: u16, msg: String) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
    cors((status, msg).into_response())
}

async fn metrics() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        METRICS.render(),
    )
        .into_response()
}

/// Single-PeerConnection signalling (`/rtc/v1`) is not implemented yet: a plain 404 makes
/// current SDKs fall back to `/rtc`.
async fn not_found() -> Response {
    error(404, "not found".into())
}

/// Token from `Authorization: Bearer` or `?access_token=`.
fn token<'a>(headers: &'a HeaderMap, query: &'a HashMap<String, String>) -> &'a str {
    if let Some(h) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        if let Some(t) = h
            .strip_prefix("Bearer ")
            .or_else(|| h.strip_prefix("bearer "))
        {
            return t.trim();
        }
    }
    query.get("access_token").map(String::as_str).unwrap_or("")
}

/// Check the token and the room, as both `/rtc` and `/rtc/validate` do.
async fn admit(
    state: &AppState,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
) -> Result<(JoinParams, Addr<arbor_actors::room::Room>), (u16, String)> {
    let claims = state
        .auth
        .verify(token(headers, query))
        .map_err(|e| (e.status(), e.to_string()))?;
    if !claims.video.room_join {
        let e = AuthError::Denied("token lacks the roomJoin grant");
        return Err((e.status(), e.to_string()));
    }
    let identity = if claims.sub.is_empty() {
        return Err((400, "token has no identity (sub)".into()));
    } else {
        claims.sub.clone()
    };
    let room_name = claims.video.room.clone();
    if room_name.is_empty() {
        return Err((400, "token names no room (video.room)".into()));
    }
    let room = state
        .manager
        .send(GetRoom {
            name: room_name.clone(),
            create: state.settings.auto_create,
        })
        .await
        .map_err(|e| (503, format!("room manager unavailable: {e}")))?
        .map_err(|e| match e {
            RoomError::NotFound => (404, "requested room does not exist".to_string()),
            other => (503, other.to_string()),
        })?;
    let flag = |k: &str, default: bool| match query.get(k).map(String::as_str) {
        Some("1") | Some("true") => true,
        Some("0") | Some("false") => false,
        _ => default,
    };
    let params = JoinParams {
        identity,
        name: claims.name.clone(),
        metadata: claims.metadata.clone(),
        attributes: claims.attributes.clone().into_iter().collect(),
        permission: crate::auth::permission(&claims),
        kind: match claims.kind.as_str() {
            "ingress" => 1,
            "egress" => 2,
            "sip" => 3,
            "agent" => 4,
            _ => 0,
        },
        auto_subscribe: flag("auto_subscribe", true),
        protocol: query
            .get("protocol")
            .and_then(|p| p.parse().ok())
            .unwrap_or(0),
        client_protocol: query
            .get("client_protocol")
            .and_then(|p| p.parse().ok())
            .unwrap_or(0),
        room_name,
    };
    Ok((params, room))
}

async fn validate(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    match admit(&state, &headers, &query).await {
        Ok(_) => cors((StatusCode::OK, "success").into_response()),
        Err((status, msg)) => error(status, msg),
    }
}

async fn rtc(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let Ok(ws) = ws else {
        return error(404, "not a WebSocket upgrade".into());
    };
    if matches!(
        query.get("reconnect").map(String::as_str),
        Some("1") | Some("true")
    ) {
        // A resume: the client lost its signal connection (to this node, or to a node that died
        // behind the same URL) and asks to continue its session. Arbor ends a session when its
        // signal connection drops, so there is never one to resume here; LiveKit answers an
        // unknown participant's resume with a `LeaveRequest` telling the client to reconnect in
        // full, and SDKs then join afresh (through the same URL, which a load balancer may
        // route to another node). The token is still checked: no reply to strangers.
        if let Err(e) = state.auth.verify(token(&headers, &query)) {
            return error(e.status(), e.to_string());
        }
        tracing::info!("resume for a session this node does not hold: asking for a full rejoin");
        return ws.on_upgrade(signal::refuse_resume);
    }
    let (params, room) = match admit(&state, &headers, &query).await {
        Ok(x) => x,
        Err((status, msg)) => {
            tracing::info!(status, %msg, "signal connection refused");
            return error(status, msg);
        }
    };
    let max = state.max_message_bytes;
    ws.max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(state.ws_buffer_bytes)
        .write_buffer_size(state.ws_buffer_bytes)
        .on_upgrade(move |socket| signal::session(socket, state, params, room))
}
