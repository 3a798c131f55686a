//! Server configuration: a YAML file in LiveKit's spirit, embedded dev defaults, command-line
//! overrides. Every key is documented in `deploy/config-sample.yaml`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

/// Configuration errors name the key and the problem.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {msg}")]
    Parse { path: PathBuf, msg: String },
    #[error("invalid value for `{key}`: {msg}")]
    Invalid { key: &'static str, msg: String },
}

fn invalid(key: &'static str, msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        msg: msg.into(),
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// HTTP / WebSocket / Twirp port.
    pub port: u16,
    /// Addresses the HTTP server listens on.
    pub bind_addresses: Vec<IpAddr>,
    pub rtc: RtcConfig,
    /// API key → secret.
    pub keys: BTreeMap<String, String>,
    /// A file of `key: secret` lines, merged into `keys`.
    pub key_file: Option<PathBuf>,
    pub room: RoomConfig,
    pub limit: LimitConfig,
    pub logging: LoggingConfig,
    /// Region reported to clients.
    pub region: String,
    /// Node id reported to clients (default: generated).
    pub node_id: Option<String>,
    /// Seed for identifier generation (default: from the OS; logged at start).
    pub seed: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RtcConfig {
    /// The single UDP port for all media.
    pub udp_port: u16,
    /// ICE-TCP port (0 disables ICE-TCP).
    pub tcp_port: u16,
    /// Address advertised in ICE candidates (default: the first non-loopback IPv4 address).
    pub node_ip: Option<IpAddr>,
    /// Local address the media sockets bind to (default 0.0.0.0).
    pub bind: Option<IpAddr>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoomConfig {
    /// Seconds an unjoined room stays open.
    pub empty_timeout: u64,
    /// Seconds a room stays open after the last participant left.
    pub departure_timeout: u64,
    /// Maximum participants per room (0 = unlimited).
    pub max_participants: u32,
    /// Create rooms on first join.
    pub auto_create: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitConfig {
    pub max_rooms: usize,
    pub max_tracks_per_participant: usize,
    pub max_data_packet_bytes: usize,
    pub max_metadata_bytes: usize,
    /// Largest accepted WebSocket message.
    pub max_signal_message_bytes: usize,
    /// Responses queued to one client before it is dropped as too slow.
    pub signal_queue: usize,
    /// Peer connections per node (two per participant).
    pub max_peers: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoggingConfig {
    /// `trace`, `debug`, `info`, `warn`, `error` (RUST_LOG overrides).
    pub level: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            port: 7880,
            bind_addresses: vec![IpAddr::from([127, 0, 0, 1])],
            rtc: RtcConfig::default(),
            keys: BTreeMap::new(),
            key_file: None,
            room: RoomConfig::default(),
            limit: LimitConfig::default(),
            logging: LoggingConfig::default(),
            region: String::new(),
            node_id: None,
            seed: None,
        }
    }
}

impl Default for RtcConfig {
    fn default() -> Self {
        RtcConfig {
            udp_port: 7882,
            tcp_port: 7881,
            node_ip: None,
            bind: None,
        }
    }
}

impl Default for RoomConfig {
    fn default() -> Self {
        RoomConfig {
            empty_timeout: 300,
            departure_timeout: 20,
            max_participants: 0,
            auto_create: true,
        }
    }
}

impl Default for LimitConfig {
    fn default() -> Self {
        LimitConfig {
            max_rooms: 10_000,
            max_tracks_per_participant: 32,
            max_data_packet_bytes: 64 * 1024,
            max_metadata_bytes: 64 * 1024,
            max_signal_message_bytes: 256 * 1024,
            signal_queue: 1024,
            max_peers: 20_000,
        }
    }
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig {
            level: "info".into(),
        }
    }
}

impl Config {
    /// Read and parse a YAML file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_yaml(&text).map_err(|msg| ConfigError::Parse {
            path: path.to_path_buf(),
            msg,
        })
    }

    /// Parse YAML text (an empty document gives the defaults).
    pub fn from_yaml(text: &str) -> Result<Config, String> {
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        serde_yaml::from_str(text).map_err(|e| e.to_string())
    }

    /// The development defaults: key `devkey` / secret `secret`.
    pub fn dev() -> Config {
        let mut c = Config::default();
        c.keys.insert("devkey".into(), "secret".into());
        c
    }

    /// Load `key_file` (lines `key: secret`) into `keys`.
    pub fn load_key_file(&mut self) -> Result<(), ConfigError> {
        let Some(path) = self.key_file.clone() else {
            return Ok(());
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((k, v)) = line.split_once(':') else {
                return Err(invalid(
                    "key_file",
                    format!("{}:{}: expected `key: secret`", path.display(), n + 1),
                ));
            };
            self.keys.insert(k.trim().to_string(), v.trim().to_string());
        }
        Ok(())
    }

    /// Check every value; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.port == 0 {
            return Err(invalid("port", "must be 1-65535"));
        }
        if self.bind_addresses.is_empty() {
            return Err(invalid("bind_addresses", "at least one address is needed"));
        }
        if self.rtc.udp_port == 0 {
            return Err(invalid("rtc.udp_port", "must be 1-65535"));
        }
        if self.rtc.udp_port == self.rtc.tcp_port {
            return Err(invalid("rtc.tcp_port", "must differ from rtc.udp_port"));
        }
        if self.keys.is_empty() {
            return Err(invalid("keys", "no API key configured (add `keys: {mykey: mysecret}`, use key_file, or run with --dev)"));
        }
        for (k, v) in &self.keys {
            if k.is_empty() {
                return Err(invalid("keys", "empty API key"));
            }
            if v.is_empty() {
                return Err(invalid("keys", format!("missing secret for key `{k}`")));
            }
        }
        if self.limit.max_signal_message_bytes < 4096 {
            return Err(invalid(
                "limit.max_signal_message_bytes",
                "must be at least 4096",
            ));
        }
        if self.limit.signal_queue == 0 {
            return Err(invalid("limit.signal_queue", "must be positive"));
        }
        if self.limit.max_peers == 0 {
            return Err(invalid("limit.max_peers", "must be positive"));
        }
        if self.limit.max_rooms == 0 {
            return Err(invalid("limit.max_rooms", "must be positive"));
        }
        match self.logging.level.as_str() {
            "trace" | "debug" | "info" | "warn" | "error" => {}
            other => return Err(invalid("logging.level", format!("unknown level `{other}`"))),
        }
        Ok(())
    }

    /// Room settings for the actors.
    pub fn room_settings(&self, node_id: String) -> arbor_actors::config::RoomSettings {
        arbor_actors::config::RoomSettings {
            empty_timeout: Duration::from_secs(self.room.empty_timeout),
            departure_timeout: Duration::from_secs(self.room.departure_timeout),
            max_participants: self.room.max_participants,
            auto_create: self.room.auto_create,
            max_rooms: self.limit.max_rooms,
            max_tracks_per_participant: self.limit.max_tracks_per_participant,
            max_data_packet_bytes: self.limit.max_data_packet_bytes,
            max_metadata_bytes: self.limit.max_metadata_bytes,
            signal_queue: self.limit.signal_queue,
            ping_interval: 5,
            ping_timeout: 15,
            node_id,
            region: self.region.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_yaml_is_defaults() {
        let c = Config::from_yaml("").unwrap();
        assert_eq!(c.port, 7880);
        assert_eq!(c.rtc.udp_port, 7882);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = Config::from_yaml("port: 7880\nbogus: 1\n").unwrap_err();
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn nested_keys_parse() {
        let c = Config::from_yaml("rtc:\n  udp_port: 9000\n  node_ip: 10.0.0.1\nkeys:\n  k: s\nroom:\n  empty_timeout: 5\n").unwrap();
        assert_eq!(c.rtc.udp_port, 9000);
        assert_eq!(c.keys.get("k").map(String::as_str), Some("s"));
        assert_eq!(c.room.empty_timeout, 5);
        c.validate().unwrap();
    }

    #[test]
    fn sample_config_is_valid() {
        let c = Config::from_yaml(include_str!("../deploy/config-sample.yaml")).unwrap();
        c.validate().unwrap();
        assert_eq!(c.port, Config::default().port);
    }

    #[test]
    fn validation_names_the_key() {
        let mut c = Config::dev();
        c.port = 0;
        assert!(c.validate().unwrap_err().to_string().contains("`port`"));
        let mut c = Config::dev();
        c.keys.insert("k2".into(), String::new());
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("missing secret"));
        let c = Config::default();
        assert!(c.validate().unwrap_err().to_string().contains("`keys`"));
    }
}
