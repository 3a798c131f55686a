//! LiveKit's server API: the Twirp `livekit.RoomService` at
//! `POST /twirp/livekit.RoomService/<Method>`.
//!
//! Twirp is protobuf-over-HTTP: one POST per call, the body is the request message encoded as
//! `application/protobuf` (Python and Rust server SDKs) or proto3 JSON `application/json` (the
//! Node SDK: camelCase names, int64 as strings, enum names). The answer uses the request's
//! encoding; errors are always JSON `{"code": "not_found", "msg": "..."}` with the HTTP status
//! the code implies. JSON decoding uses `livekit-protocol`'s pbjson impls, which accept both
//! camelCase and snake_case names and ignore unknown fields, as protobuf-es does.
//!
//! Authorization follows LiveKit: `CreateRoom`/`DeleteRoom` need `roomCreate`, `ListRooms` needs
//! `roomList`, everything else needs `roomAdmin` with `video.room` equal to the request's room.
//! A refused call changes nothing: grants and arguments are checked before any actor is told.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use actix::Addr;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use livekit_api::access_token::Claims;
use livekit_protocol as lk;
use prost::Message as _;
use serde::de::DeserializeOwned;
use serde::Serialize;

use arbor_actors::manager::{GetRoom, ListRooms};
use arbor_actors::metrics::METRICS;
use arbor_actors::room::{self, Room, RpcFailure};
use arbor_actors::RoomError;

use crate::http::AppState;

/// How long `DeleteRoom` waits for the room actor to finish stopping, so that a `ListRooms`
/// right after it no longer shows the room.
const DELETE_WAIT: Duration = Duration::from_secs(2);

/// A Twirp error: a code from the Twirp spec and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TwirpError {
    pub code: &'static str,
    pub msg: String,
    pub meta: BTreeMap<String, String>,
}

impl TwirpError {
    pub fn new(code: &'static str, msg: impl Into<String>) -> Self {
        TwirpError {
            code,
            msg: msg.into(),
            meta: BTreeMap::new(),
        }
    }

    /// The HTTP status the Twirp spec assigns to the code.
    pub fn status(&self) -> StatusCode {
        match self.code {
            "canceled" => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            "invalid_argument" | "malformed" | "out_of_range" => StatusCode::BAD_REQUEST,
            "deadline_exceeded" => StatusCode::REQUEST_TIMEOUT,
            "not_found" | "bad_route" => StatusCode::NOT_FOUND,
            "already_exists" | "aborted" => StatusCode::CONFLICT,
            "permission_denied" => StatusCode::FORBIDDEN,
            "unauthenticated" => StatusCode::UNAUTHORIZED,
            "resource_exhausted" => StatusCode::TOO_MANY_REQUESTS,
            "failed_precondition" => StatusCode::PRECONDITION_FAILED,
            "unimplemented" => StatusCode::NOT_IMPLEMENTED,
            "unavailable" => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn body(&self) -> String {
        serde_json::json!({"code": self.code, "msg": self.msg, "meta": self.meta}).to_string()
    }
}

impl IntoResponse for TwirpError {
    fn into_response(self) -> Response {
        METRICS
            .api_errors
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(code = self.code, msg = %self.msg, "server API error");
        (
            self.status(),
            [(header::CONTENT_TYPE, "application/json")],
            self.body(),
        )
            .into_response()
    }
}

impl From<RoomError> for TwirpError {
    fn from(e: RoomError) -> Self {
        let code = match &e {
            RoomError::NotFound
            | RoomError::ParticipantNotFound(_)
            | RoomError::TrackNotFound(_) => "not_found",
            RoomError::RoomFull(_)
            | RoomError::TooManyTracks(_)
            | RoomError::TooManyRooms(_)
            | RoomError::LimitExceeded(_) => "resource_exhausted",
            RoomError::InvalidArgument(_) => "invalid_argument",
            RoomError::NotAllowed(_) => "failed_precondition",
            RoomError::RoomClosed(_)
            | RoomError::Media(_)
            | RoomError::Mailbox(_)
            | RoomError::Directory(_) => "unavailable",
        };
        TwirpError::new(code, e.to_string())
    }
}

impl From<actix::MailboxError> for TwirpError {
    fn from(e: actix::MailboxError) -> Self {
        TwirpError::new("unavailable", format!("room unavailable: {e}"))
    }
}

/// How the request body (and so the response) is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Protobuf,
    Json,
}

impl Format {
    /// From the request's `Content-Type` (parameters such as `charset` are ignored).
    pub fn from_content_type(ct: Option<&str>) -> Result<Format, TwirpError> {
        let ct = ct.unwrap_or("");
        let base = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match base.as_str() {
            "application/protobuf" | "application/x-protobuf" => Ok(Format::Protobuf),
            "application/json" => Ok(Format::Json),
            _ => Err(TwirpError::new(
                "bad_route",
                format!(
                    "unexpected Content-Type `{ct}` (use application/protobuf or application/json)"
                ),
            )),
        }
    }
}

/// Decode a request body.
pub fn decode<T>(format: Format, body: &[u8]) -> Result<T, TwirpError>
where
    T: prost::Message + Default + DeserializeOwned,
{
    match format {
        Format::Protobuf => T::decode(body)
            .map_err(|e| TwirpError::new("malformed", format!("invalid protobuf body: {e}"))),
        Format::Json => {
            // An empty JSON body is the empty message, as in protobuf.
            if body.iter().all(u8::is_ascii_whitespace) {
                return Ok(T::default());
            }
            serde_json::from_slice(body)
                .map_err(|e| TwirpError::new("malformed", format!("invalid JSON body: {e}")))
        }
    }
}

/// Encode a response body.
pub fn encode<T>(format: Format, msg: &T) -> Response
where
    T: prost::Message + Serialize,
{
    match format {
        Format::Protobuf => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/protobuf")],
            msg.encode_to_vec(),
        )
            .into_response(),
        Format::Json => match serde_json::to_vec(msg) {
            Ok(b) => (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                b,
            )
                .into_response(),
            Err(e) => {
                TwirpError::new("internal", format!("encoding the response: {e}")).into_response()
            }
        },
    }
}

/// What the caller's token allows.
struct Caller {
    claims: Claims,
}

impl Caller {
    fn require_create(&self) -> Result<(), TwirpError> {
        if self.claims.video.room_create {
            Ok(())
        } else {
            Err(TwirpError::new(
                "permission_denied",
                "this call requires the roomCreate grant",
            ))
        }
    }

    fn require_list(&self) -> Result<(), TwirpError> {
        if self.claims.video.room_list {
            Ok(())
        } else {
            Err(TwirpError::new(
                "permission_denied",
                "this call requires the roomList grant",
            ))
        }
    }

    fn require_admin(&self, room: &str) -> Result<(), TwirpError> {
        if room.is_empty() {
            return Err(TwirpError::new("invalid_argument", "`room` is required"));
        }
        let v = &self.claims.video;
        if v.room_admin && v.room == room {
            Ok(())
        } else {
            Err(TwirpError::new(
                "permission_denied",
                format!("this call requires the roomAdmin grant for room `{room}`"),
            ))
        }
    }
}

fn bearer(headers: &HeaderMap) -> &str {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(|h| {
            h.strip_prefix("Bearer ")
                .or_else(|| h.strip_prefix("bearer "))
                .unwrap_or(h)
                .trim()
        })
        .unwrap_or("")
}

fn cors(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("POST, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("*"),
    );
    r
}

/// CORS preflight: everything is allowed, as in LiveKit.
pub async fn preflight() -> Response {
    cors(StatusCode::NO_CONTENT.into_response())
}

/// A Twirp path that is not `livekit.RoomService/<Method>`.
pub async fn bad_route(Path(path): Path<String>) -> Response {
    cors(
        TwirpError::new(
            "bad_route",
            format!("no such service or method: /twirp/{path}"),
        )
        .into_response(),
    )
}

/// `POST /twirp/livekit.RoomService/{method}`.
pub async fn handle(
    State(state): State<AppState>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    METRICS
        .api_requests
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let r = match dispatch(&state, &method, &headers, &body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    cors(r)
}

async fn dispatch(
    state: &AppState,
    method: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, TwirpError> {
    // Routing comes first (as in Twirp): an unknown method is `bad_route` whatever the token.
    const METHODS: [&str; 12] = [
        "CreateRoom",
        "ListRooms",
        "DeleteRoom",
        "ListParticipants",
        "GetParticipant",
        "RemoveParticipant",
        "MutePublishedTrack",
        "UpdateParticipant",
        "UpdateSubscriptions",
        "SendData",
        "UpdateRoomMetadata",
        "PerformRpc",
    ];
    if !METHODS.contains(&method) {
        return Err(TwirpError::new(
            "bad_route",
            format!("no such method: livekit.RoomService/{method}"),
        ));
    }
    let format = Format::from_content_type(
        headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
    )?;
    let claims = state
        .auth
        .verify(bearer(headers))
        .map_err(|e| TwirpError::new("unauthenticated", e.to_string()))?;
    let caller = Caller { claims };
    use tracing::Instrument as _;
    let span = tracing::info_span!("twirp", method);
    async move {
        match method {
            "CreateRoom" => call(format, body, |r| create_room(state, &caller, r)).await,
            "ListRooms" => call(format, body, |r| list_rooms(state, &caller, r)).await,
            "DeleteRoom" => call(format, body, |r| delete_room(state, &caller, r)).await,
            "ListParticipants" => {
                call(format, body, |r| list_participants(state, &caller, r)).await
            }
            "GetParticipant" => call(format, body, |r| get_participant(state, &caller, r)).await,
            "RemoveParticipant" => {
                call(format, body, |r| remove_participant(state, &caller, r)).await
            }
            "MutePublishedTrack" => call(format, body, |r| mute_track(state, &caller, r)).await,
            "UpdateParticipant" => {
                call(format, body, |r| update_participant(state, &caller, r)).await
            }
            "UpdateSubscriptions" => {
                call(format, body, |r| update_subscriptions(state, &caller, r)).await
            }
            "SendData" => call(format, body, |r| send_data(state, &caller, r)).await,
            "UpdateRoomMetadata" => {
                call(format, body, |r| update_room_metadata(state, &caller, r)).await
            }
            "PerformRpc" => call(format, body, |r| perform_rpc(state, &caller, r)).await,
            other => Err(TwirpError::new(
                "bad_route",
                format!("no such method: livekit.RoomService/{other}"),
            )),
        }
    }
    .instrument(span)
    .await
}

/// Decode, run, encode.
async fn call<Req, Resp, F, Fut>(format: Format, body: &[u8], f: F) -> Result<Response, TwirpError>
where
    Req: prost::Message + Default + DeserializeOwned,
    Resp: prost::Message + Serialize,
    F: FnOnce(Req) -> Fut,
    Fut: Future<Output = Result<Resp, TwirpError>>,
{
    let req = decode::<Req>(format, body)?;
    let resp = f(req).await?;
    Ok(encode(format, &resp))
}

async fn find_room(state: &AppState, name: &str) -> Result<Addr<Room>, TwirpError> {
    state
        .manager
        .send(GetRoom {
            name: name.to_string(),
            create: false,
        })
        .await?
        .map_err(|e| match e {
            RoomError::NotFound => TwirpError::new("not_found", format!("room `{name}` not found")),
            other => other.into(),
        })
}

fn check_metadata(state: &AppState, len: usize) -> Result<(), TwirpError> {
    let max = state.settings.max_metadata_bytes;
    if len > max {
        return Err(TwirpError::new(
            "resource_exhausted",
            format!("metadata too large ({len} bytes; limit.max_metadata_bytes = {max})"),
        ));
    }
    Ok(())
}

async fn create_room(
    state: &AppState,
    caller: &Caller,
    req: lk::CreateRoomRequest,
) -> Result<lk::Room, TwirpError> {
    caller.require_create()?;
    if req.name.is_empty() {
        return Err(TwirpError::new("invalid_argument", "`name` is required"));
    }
    check_metadata(state, req.metadata.len())?;
    // Room policies per room: `room_preset` names an entry of the config's `room.presets`.
    let policy = if req.room_preset.is_empty() {
        None
    } else {
        match state.settings.presets.get(&req.room_preset) {
            Some(p) => Some(*p),
            None => {
                let known: Vec<&str> = state.settings.presets.keys().map(String::as_str).collect();
                return Err(TwirpError::new(
                    "invalid_argument",
                    format!(
                        "unknown room_preset `{}` (room.presets has: {})",
                        req.room_preset,
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    ),
                ));
            }
        }
    };
    let room = state
        .manager
        .send(GetRoom {
            name: req.name.clone(),
            create: true,
        })
        .await??;
    let info = room
        .send(room::Configure {
            empty_timeout: req.empty_timeout,
            departure_timeout: req.departure_timeout,
            max_participants: req.max_participants,
            metadata: req.metadata,
            policy,
        })
        .await?;
    Ok(info)
}

async fn list_rooms(
    state: &AppState,
    caller: &Caller,
    req: lk::ListRoomsRequest,
) -> Result<lk::ListRoomsResponse, TwirpError> {
    caller.require_list()?;
    let all = state.manager.send(ListRooms).await?;
    let rooms = all
        .into_iter()
        .map(|s| s.info)
        .filter(|r| req.names.is_empty() || req.names.contains(&r.name))
        .collect();
    Ok(lk::ListRoomsResponse { rooms })
}

async fn delete_room(
    state: &AppState,
    caller: &Caller,
    req: lk::DeleteRoomRequest,
) -> Result<lk::DeleteRoomResponse, TwirpError> {
    caller.require_create()?;
    let room = find_room(state, &req.room).await?;
    room.send(room::CloseRoom).await?;
    let deadline = tokio::time::Instant::now() + DELETE_WAIT;
    while room.connected() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(lk::DeleteRoomResponse {})
}

async fn list_participants(
    state: &AppState,
    caller: &Caller,
    req: lk::ListParticipantsRequest,
) -> Result<lk::ListParticipantsResponse, TwirpError> {
    caller.require_admin(&req.room)?;
    let room = find_room(state, &req.room).await?;
    let s = room.send(room::Summarize).await?;
    Ok(lk::ListParticipantsResponse {
        participants: s.participants,
    })
}

async fn get_participant(
    state: &AppState,
    caller: &Caller,
    req: lk::RoomParticipantIdentity,
) -> Result<lk::ParticipantInfo, TwirpError> {
    caller.require_admin(&req.room)?;
    let room = find_room(state, &req.room).await?;
    let s = room.send(room::Summarize).await?;
    s.participants
        .into_iter()
        .find(|p| p.identity == req.identity)
        .ok_or_else(|| RoomError::ParticipantNotFound(req.identity).into())
}

async fn remove_participant(
    state: &AppState,
    caller: &Caller,
    req: lk::RoomParticipantIdentity,
) -> Result<lk::RemoveParticipantResponse, TwirpError> {
    caller.require_admin(&req.room)?;
    let room = find_room(state, &req.room).await?;
    room.send(room::RemoveParticipant {
        identity: req.identity,
    })
    .await??;
    Ok(lk::RemoveParticipantResponse {})
}

async fn mute_track(
    state: &AppState,
    caller: &Caller,
    req: lk::MuteRoomTrackRequest,
) -> Result<lk::MuteRoomTrackResponse, TwirpError> {
    caller.require_admin(&req.room)?;
    let room = find_room(state, &req.room).await?;
    let track = room
        .send(room::AdminMuteTrack {
            identity: req.identity,
            track_sid: req.track_sid,
            muted: req.muted,
        })
        .await??;
    Ok(lk::MuteRoomTrackResponse { track: Some(track) })
}

async fn update_participant(
    state: &AppState,
    caller: &Caller,
    req: lk::UpdateParticipantRequest,
) -> Result<lk::ParticipantInfo, TwirpError> {
    caller.require_admin(&req.room)?;
    let room = find_room(state, &req.room).await?;
    let info = room
        .send(room::AdminUpdateParticipant {
            identity: req.identity,
            name: req.name,
            metadata: req.metadata,
            attributes: req.attributes,
            permission: req.permission,
        })
        .await??;
    Ok(info)
}

async fn update_subscriptions(
    state: &AppState,
    caller: &Caller,
    req: lk::UpdateSubscriptionsRequest,
) -> Result<lk::UpdateSubscriptionsResponse, TwirpError> {
    caller.require_admin(&req.room)?;
    let room = find_room(state, &req.room).await?;
    let mut track_sids = req.track_sids;
    for pt in req.participant_tracks {
        track_sids.extend(pt.track_sids);
    }
    room.send(room::AdminUpdateSubscriptions {
        identity: req.identity,
        track_sids,
        subscribe: req.subscribe,
    })
    .await??;
    Ok(lk::UpdateSubscriptionsResponse {})
}

/// The `DataPacket` a `SendData` call delivers (sender: the server, so no identity).
pub fn server_data_packet(req: &lk::SendDataRequest) -> lk::DataPacket {
    #[allow(deprecated)]
    lk::DataPacket {
        kind: req.kind,
        destination_identities: req.destination_identities.clone(),
        value: Some(lk::data_packet::Value::User(lk::UserPacket {
            payload: req.data.clone(),
            destination_identities: req.destination_identities.clone(),
            topic: req.topic.clone(),
            nonce: req.nonce.clone(),
            ..Default::default()
        })),
        ..Default::default()
    }
}

async fn send_data(
    state: &AppState,
    caller: &Caller,
    req: lk::SendDataRequest,
) -> Result<lk::SendDataResponse, TwirpError> {
    caller.require_admin(&req.room)?;
    let room = find_room(state, &req.room).await?;
    let reliable = req.kind != lk::data_packet::Kind::Lossy as i32;
    let data = server_data_packet(&req).encode_to_vec();
    room.send(room::ServerData {
        reliable,
        destinations: req.destination_identities,
        data,
    })
    .await??;
    Ok(lk::SendDataResponse {})
}

async fn update_room_metadata(
    state: &AppState,
    caller: &Caller,
    req: lk::UpdateRoomMetadataRequest,
) -> Result<lk::Room, TwirpError> {
    caller.require_admin(&req.room)?;
    check_metadata(state, req.metadata.len())?;
    let room = find_room(state, &req.room).await?;
    Ok(room.send(room::SetRoomMetadata(req.metadata)).await??)
}

/// Turn an RPC failure into the Twirp error the server SDKs surface.
pub fn rpc_error(f: RpcFailure) -> TwirpError {
    match f {
        RpcFailure::Error {
            code,
            message,
            data,
        } => {
            let mut e = TwirpError::new("internal", message);
            e.meta.insert("rpc_code".into(), code.to_string());
            if !data.is_empty() {
                e.meta.insert("rpc_data".into(), data);
            }
            e
        }
        RpcFailure::ConnectionTimeout => TwirpError::new(
            "unavailable",
            "RPC connection timeout: the destination did not acknowledge the request",
        ),
        RpcFailure::ResponseTimeout => TwirpError::new(
            "deadline_exceeded",
            "RPC response timeout: the destination did not answer in time",
        ),
    }
}

async fn perform_rpc(
    state: &AppState,
    caller: &Caller,
    req: lk::PerformRpcRequest,
) -> Result<lk::PerformRpcResponse, TwirpError> {
    caller.require_admin(&req.room)?;
    if req.destination_identity.is_empty() {
        return Err(TwirpError::new(
            "invalid_argument",
            "`destinationIdentity` is required",
        ));
    }
    let room = find_room(state, &req.room).await?;
    let rx = room
        .send(room::PerformRpc {
            identity: req.destination_identity,
            method: req.method,
            payload: req.payload,
            response_timeout: Duration::from_millis(req.response_timeout_ms.into()),
        })
        .await??;
    // The room resolves every pending call within its timeouts; this bound only guards
    // against a room that stops meanwhile (the sender is then dropped).
    let bound = room::RPC_MAX_RESPONSE_TIMEOUT + room::RPC_ACK_TIMEOUT;
    match tokio::time::timeout(bound, rx).await {
        Ok(Ok(Ok(payload))) => Ok(lk::PerformRpcResponse { payload }),
        Ok(Ok(Err(f))) => Err(rpc_error(f)),
        Ok(Err(_)) => Err(TwirpError::new(
            "unavailable",
            "the room closed before the RPC completed",
        )),
        Err(_) => Err(rpc_error(RpcFailure::ResponseTimeout)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types() {
        assert_eq!(
            Format::from_content_type(Some("application/protobuf")).unwrap(),
            Format::Protobuf
        );
        assert_eq!(
            Format::from_content_type(Some("application/json; charset=utf-8")).unwrap(),
            Format::Json
        );
        let e = Format::from_content_type(Some("text/plain")).unwrap_err();
        assert_eq!(e.code, "bad_route");
        assert_eq!(
            Format::from_content_type(None).unwrap_err().code,
            "bad_route"
        );
    }

    #[test]
    fn json_accepts_both_name_styles_and_int64_strings() {
        let a: lk::CreateRoomRequest = decode(
            Format::Json,
            br#"{"name":"r","emptyTimeout":7,"maxParticipants":3}"#,
        )
        .unwrap();
        let b: lk::CreateRoomRequest = decode(
            Format::Json,
            br#"{"name":"r","empty_timeout":7,"max_participants":3}"#,
        )
        .unwrap();
        assert_eq!(a, b);
        assert_eq!(a.empty_timeout, 7);
        let p: lk::RoomParticipantIdentity = decode(
            Format::Json,
            br#"{"room":"r","identity":"i","revokeTokenTs":"123"}"#,
        )
        .unwrap();
        assert_eq!(p.revoke_token_ts, 123);
        // Enum names, and unknown fields are ignored.
        let d: lk::SendDataRequest = decode(
            Format::Json,
            br#"{"room":"r","data":"aGk=","kind":"LOSSY","futureField":1}"#,
        )
        .unwrap();
        assert_eq!(d.kind, lk::data_packet::Kind::Lossy as i32);
        assert_eq!(d.data, b"hi");
        // Empty body is the empty message.
        let e: lk::ListRoomsRequest = decode(Format::Json, b"").unwrap();
        assert!(e.names.is_empty());
    }

    #[test]
    fn malformed_bodies_are_errors_not_panics() {
        let e = decode::<lk::CreateRoomRequest>(Format::Json, b"{not json").unwrap_err();
        assert_eq!(e.code, "malformed");
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        let e = decode::<lk::CreateRoomRequest>(Format::Protobuf, &[0xff, 0xff, 0xff]).unwrap_err();
        assert_eq!(e.code, "malformed");
        let e = decode::<lk::CreateRoomRequest>(Format::Json, br#"{"maxParticipants":"x"}"#)
            .unwrap_err();
        assert_eq!(e.code, "malformed");
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..2000 {
            let len = (seed % 64) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            let _ = decode::<lk::UpdateParticipantRequest>(Format::Protobuf, &bytes);
            let _ = decode::<lk::UpdateParticipantRequest>(Format::Json, &bytes);
        }
    }

    #[test]
    fn responses_use_the_request_encoding() {
        let room = lk::Room {
            name: "r".into(),
            creation_time: 5,
            ..Default::default()
        };
        let r = encode(Format::Json, &room);
        assert_eq!(
            r.headers().get(header::CONTENT_TYPE).unwrap(),
            "application/json"
        );
        let json = serde_json::to_string(&room).unwrap();
        assert!(json.contains(r#""creationTime":"5""#), "{json}");
        let r = encode(Format::Protobuf, &room);
        assert_eq!(
            r.headers().get(header::CONTENT_TYPE).unwrap(),
            "application/protobuf"
        );
    }

    #[test]
    fn error_codes_map_to_statuses() {
        for (code, status) in [
            ("not_found", 404),
            ("permission_denied", 403),
            ("unauthenticated", 401),
            ("malformed", 400),
            ("bad_route", 404),
            ("resource_exhausted", 429),
            ("deadline_exceeded", 408),
            ("internal", 500),
        ] {
            assert_eq!(TwirpError::new(code, "x").status().as_u16(), status);
        }
        let e = TwirpError::new("not_found", "room `r` not found");
        let v: serde_json::Value = serde_json::from_str(&e.body()).unwrap();
        assert_eq!(v["code"], "not_found");
        assert_eq!(v["msg"], "room `r` not found");
        let e: TwirpError = RoomError::ParticipantNotFound("x".into()).into();
        assert_eq!(e.code, "not_found");
    }

    #[test]
    fn grants_are_checked_like_livekit() {
        let mut claims = Claims::default();
        claims.video.room_admin = true;
        claims.video.room = "a".into();
        let c = Caller { claims };
        assert!(c.require_admin("a").is_ok());
        assert_eq!(c.require_admin("b").unwrap_err().code, "permission_denied");
        assert_eq!(c.require_create().unwrap_err().code, "permission_denied");
        assert_eq!(c.require_list().unwrap_err().code, "permission_denied");
        assert_eq!(c.require_admin("").unwrap_err().code, "invalid_argument");
    }

    #[test]
    fn server_data_has_no_sender_and_keeps_topic() {
        let req = lk::SendDataRequest {
            room: "r".into(),
            data: b"hello".to_vec(),
            destination_identities: vec!["b".into()],
            topic: Some("t".into()),
            ..Default::default()
        };
        let p = server_data_packet(&req);
        assert!(p.participant_identity.is_empty());
        match p.value {
            Some(lk::data_packet::Value::User(u)) => {
                assert_eq!(u.payload, b"hello");
                assert_eq!(u.topic.as_deref(), Some("t"));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
