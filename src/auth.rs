//! Access-token verification (HS256 JWT, LiveKit claims) using `livekit-api`.

use std::collections::BTreeMap;

use livekit_api::access_token::{AccessTokenError, Claims, TokenVerifier};
use livekit_protocol as lk;
use thiserror::Error;

/// Why a token was refused. `status()` gives the HTTP status LiveKit uses.
#[derive(Debug, Error)]
pub enum AuthError {
    #[error(
        "authorization token is missing (send `Authorization: Bearer <jwt>` or `?access_token=`)"
    )]
    Missing,
    #[error("invalid authorization token: {0}")]
    Invalid(String),
    #[error("unknown API key `{0}`")]
    UnknownKey(String),
    #[error("permission denied: {0}")]
    Denied(&'static str),
}

impl AuthError {
    /// The HTTP status for this error.
    pub fn status(&self) -> u16 {
        match self {
            AuthError::Missing | AuthError::Invalid(_) | AuthError::UnknownKey(_) => 401,
            AuthError::Denied(_) => 403,
        }
    }
}

/// Verifies tokens against the configured API keys.
#[derive(Clone)]
pub struct Auth {
    keys: BTreeMap<String, String>,
}

impl Auth {
    pub fn new(keys: BTreeMap<String, String>) -> Self {
        Auth { keys }
    }

    /// The first configured key (used for signing webhooks and test tokens).
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        // `iss` names the key; read it unverified, then verify with that key's secret.
        let unverified =
            Claims::from_unverified(token).map_err(|e| AuthError::Invalid(e.to_string()))?;
        let secret = self
            .keys
            .get(&unverified.iss)
            .ok_or_else(|| AuthError::UnknownKey(unverified.iss.clone()))?;
        let claims = TokenVerifier::with_api_key(&unverified.iss, secret)
            .verify(token)
            .map_err(describe)?;
        if claims.exp == 0 {
            return Err(AuthError::Invalid("token has no `exp`".into()));
        }
        Ok(claims)
    }
}

/// Say what is wrong with a token in words an operator can act on.
fn describe(e: AccessTokenError) -> AuthError {
    use jsonwebtoken::errors::ErrorKind;
    let msg = match &e {
        AccessTokenError::Encoding(inner) => match inner.kind() {
            ErrorKind::ExpiredSignature => "token expired (exp is in the past)".to_string(),
            ErrorKind::InvalidSignature => {
                "invalid token signature (wrong API secret?)".to_string()
            }
            ErrorKind::ImmatureSignature => {
                "token not yet valid (nbf is in the future)".to_string()
            }
            ErrorKind::InvalidIssuer => "token issuer (iss) is not the API key".to_string(),
            ErrorKind::MissingRequiredClaim(c) => format!("token lacks the required `{c}` claim"),
            ErrorKind::InvalidAlgorithm => "token algorithm must be HS256".to_string(),
            ErrorKind::InvalidToken => "malformed token (not a JWT)".to_string(),
            ErrorKind::Base64(_) | ErrorKind::Json(_) | ErrorKind::Utf8(_) => {
                format!("malformed token: {inner}")
            }
            _ => format!("invalid token: {inner}"),
        },
        other => other.to_string(),
    };
    AuthError::Invalid(msg)
}

/// The participant permission a token grants (LiveKit defaults for unset fields).
pub fn permission(claims: &Claims) -> lk::ParticipantPermission {
    let v = &claims.video;
    let sources = v
        .can_publish_sources
        .iter()
        .filter_map(|s| match s.as_str() {
            "camera" => Some(lk::TrackSource::Camera as i32),
            "microphone" => Some(lk::TrackSource::Microphone as i32),
            "screen_share" => Some(lk::TrackSource::ScreenShare as i32),
            "screen_share_audio" => Some(lk::TrackSource::ScreenShareAudio as i32),
            _ => None,
        })
        .collect();
    lk::ParticipantPermission {
        can_subscribe: v.can_subscribe(),
        can_publish: v.can_publish(),
        can_publish_data: v.can_publish_data(),
        can_publish_sources: sources,
        hidden: v.hidden,
        can_update_metadata: v.can_update_own_metadata(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use livekit_api::access_token::{AccessToken, VideoGrants};

    fn auth() -> Auth {
        let mut k = BTreeMap::new();
        k.insert("devkey".to_string(), "secret".to_string());
        Auth::new(k)
    }

    #[test]
    fn good_token_verifies() {
        let t = AccessToken::with_api_key("devkey", "secret")
            .with_identity("a")
            .with_grants(VideoGrants {
                room_join: true,
                room: "r".into(),
                ..Default::default()
            })
            .to_jwt()
            .unwrap();
        let c = auth().verify(&t).unwrap();
        assert_eq!(c.sub, "a");
        assert!(permission(&c).can_publish);
    }

    #[test]
    fn bad_tokens_are_refused() {
        assert!(matches!(auth().verify(""), Err(AuthError::Missing)));
        assert!(matches!(
            auth().verify("garbage"),
            Err(AuthError::Invalid(_))
        ));
        let wrong = AccessToken::with_api_key("devkey", "other")
            .with_identity("a")
            .to_jwt()
            .unwrap();
        assert!(matches!(auth().verify(&wrong), Err(AuthError::Invalid(_))));
        let unknown = AccessToken::with_api_key("nokey", "secret")
            .with_identity("a")
            .to_jwt()
            .unwrap();
        assert!(matches!(
            auth().verify(&unknown),
            Err(AuthError::UnknownKey(_))
        ));
        let expired = AccessToken::with_api_key("devkey", "secret")
            .with_identity("a")
            .with_ttl(std::time::Duration::from_secs(0))
            .to_jwt()
            .unwrap();
        // jsonwebtoken allows 60 s of leeway; a zero-TTL token is still inside it.
        let _ = auth().verify(&expired);
        let mut claims = Claims::from_unverified(&expired).unwrap();
        claims.exp = 1_000;
        claims.nbf = 0;
        let old = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(b"secret"),
        )
        .unwrap();
        let e = auth().verify(&old).unwrap_err().to_string();
        assert!(e.contains("expired"), "{e}");
    }
}
