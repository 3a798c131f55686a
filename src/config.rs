//! Server configuration: a YAML file in LiveKit's spirit, embedded dev defaults, command-line
//! overrides. Every key is documented in `deploy/config-sample.yaml`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use arbor_actors::media::shard::MAX_SHARDS;
use serde::{Deserialize, Serialize};
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
    #[error("environment variable {var}: {msg}")]
    Env { var: String, msg: String },
}

fn invalid(key: &'static str, msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        msg: msg.into(),
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
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
    pub webhook: WebhookConfig,
    pub logging: LoggingConfig,
    /// Region reported to clients.
    pub region: String,
    /// Node id reported to clients (default: generated).
    pub node_id: Option<String>,
    /// Seed for identifier generation (default: from the OS; logged at start).
    pub seed: Option<u64>,
    /// Multi-node: this SFU is also a cluster member and joins the relay fabric.
    pub cluster: ClusterRef,
}

/// The `cluster:` section: where the cluster member's TOML config is (see
/// `docs/membership.md`). Without it the node is a standalone SFU.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterRef {
    /// Path of the cluster member config (`arbor cluster init` writes one per node);
    /// relative paths are resolved against the working directory.
    pub config: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RtcConfig {
    /// The UDP port of media shard 0; shard `i` uses `udp_port + i`.
    pub udp_port: u16,
    /// ICE-TCP port (0 disables ICE-TCP). One listener for every shard.
    pub tcp_port: u16,
    /// Media shards: engine threads, each with its own UDP socket (`udp_port + i`); rooms are
    /// placed on them by a hash of their name. 0 = one per available core. At most 64.
    pub shards: usize,
    /// Address advertised in ICE candidates (default: the first non-loopback IPv4 address).
    pub node_ip: Option<IpAddr>,
    /// Local address the media sockets bind to (default 0.0.0.0).
    pub bind: Option<IpAddr>,
    /// Milliseconds a subscriber connection keeps each sent packet for retransmission
    /// (NACK → RTX). Most of a subscription's memory is this history.
    pub rtx_history_ms: u64,
    /// Most packets kept for retransmission per outgoing video stream.
    pub rtx_packets_video: usize,
    /// Most packets kept for retransmission per outgoing audio stream.
    pub rtx_packets_audio: usize,
    /// Batched UDP I/O: `recvmmsg`, `sendmmsg` and UDP GSO where the kernel has it.
    pub batch_io: bool,
    /// Scans over all peers per second for non-STUN datagrams from unknown addresses.
    pub unknown_source_scans_per_sec: u32,
    /// Forward RTP packets with rewritten headers (str0m RTP mode, the default) instead of
    /// depacketised frames (str0m frame mode). Every node of a cluster must use the same
    /// setting.
    pub rtp_mode: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
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
    /// Let the server API unmute tracks (muting is always allowed).
    pub enable_remote_unmute: bool,
    /// Forward only the video of the N most recent speakers (0 = off).
    pub last_n: usize,
    /// Participants joining after this many receive audio only (0 = off).
    pub audio_only_after: usize,
    /// Named policy sets for rooms created with `CreateRoom { room_preset: NAME }`:
    /// `NAME: "last_n=4 audio_only_after=50"` (a policy left out is off).
    pub presets: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitConfig {
    pub max_rooms: usize,
    pub max_tracks_per_participant: usize,
    pub max_data_packet_bytes: usize,
    pub max_metadata_bytes: usize,
    /// Largest accepted WebSocket message.
    pub max_signal_message_bytes: usize,
    /// Read buffer (and write-buffer target) of each signal WebSocket. Signal messages are
    /// small; larger ones are read in several chunks.
    pub signal_buffer_bytes: usize,
    /// Responses queued to one client before it is dropped as too slow.
    pub signal_queue: usize,
    /// Peer connections per node (two per participant).
    pub max_peers: usize,
    /// Signal messages per second one participant may send (token bucket; 0 = unlimited).
    pub signal_rate: u32,
    /// Burst allowance of the signal rate limit (bucket size).
    pub signal_burst: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    /// Receivers; each gets every event, in order, on its own queue.
    pub urls: Vec<String>,
    /// The API key whose secret signs the events (default: the only configured key).
    pub api_key: String,
    /// Events queued per URL before new ones are dropped (and counted in `num_dropped`).
    pub queue_size: usize,
    /// Delivery attempts per event before it is dropped.
    pub max_attempts: u32,
    /// Timeout of one delivery attempt, in milliseconds.
    pub request_timeout_ms: u64,
    /// First retry delay in milliseconds; doubles per attempt up to 30 s.
    pub retry_backoff_ms: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
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
            webhook: WebhookConfig::default(),
            logging: LoggingConfig::default(),
            region: String::new(),
            node_id: None,
            seed: None,
            cluster: ClusterRef::default(),
        }
    }
}

impl Default for RtcConfig {
    fn default() -> Self {
        RtcConfig {
            udp_port: 7882,
            tcp_port: 7881,
            shards: 1,
            node_ip: None,
            bind: None,
            rtx_history_ms: 1000,
            rtx_packets_video: 512,
            rtx_packets_audio: 64,
            batch_io: true,
            unknown_source_scans_per_sec: 20,
            rtp_mode: true,
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
            enable_remote_unmute: false,
            last_n: 0,
            audio_only_after: 0,
            presets: BTreeMap::new(),
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
            signal_buffer_bytes: 16 * 1024,
            signal_queue: 1024,
            max_peers: 20_000,
            signal_rate: 100,
            signal_burst: 200,
        }
    }
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            urls: Vec::new(),
            api_key: String::new(),
            queue_size: 1000,
            max_attempts: 5,
            request_timeout_ms: 5000,
            retry_backoff_ms: 500,
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
    /// Parse YAML text (an empty document gives the defaults).
    #[cfg(test)]
    pub fn from_yaml(text: &str) -> Result<Config, String> {
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        serde_yaml::from_str(text).map_err(|e| e.to_string())
    }

    /// The development defaults: key `devkey` / secret `secret`.
    #[cfg(test)]
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
        let text = std::fs::read_to_string(&path)
            .map_err(|e| invalid("key_file", format!("cannot read {}: {e}", path.display())))?;
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

    /// The number of media shards to run: `rtc.shards`, or with 0 the number of available
    /// cores (`std::thread::available_parallelism`), at most [`MAX_SHARDS`].
    pub fn media_shards(&self) -> usize {
        match self.rtc.shards {
            0 => std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(MAX_SHARDS),
            n => n.min(MAX_SHARDS),
        }
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
        if self.rtc.shards > MAX_SHARDS {
            return Err(invalid(
                "rtc.shards",
                format!("must be 0 (one per core) to {MAX_SHARDS}"),
            ));
        }
        // The media shards' UDP ports: udp_port .. udp_port + shards - 1.
        let shards = self.media_shards();
        let last = usize::from(self.rtc.udp_port) + shards - 1;
        if last > usize::from(u16::MAX) {
            return Err(invalid(
                "rtc.udp_port",
                format!("with {shards} media shards the UDP ports run past 65535"),
            ));
        }
        let udp_ports = usize::from(self.rtc.udp_port)..=last;
        let range = if shards == 1 {
            "rtc.udp_port".to_string()
        } else {
            format!("the media shards' UDP ports {}-{last}", self.rtc.udp_port)
        };
        if udp_ports.contains(&usize::from(self.rtc.tcp_port)) {
            return Err(invalid("rtc.tcp_port", format!("must differ from {range}")));
        }
        if udp_ports.contains(&usize::from(self.port)) {
            return Err(invalid("port", format!("must differ from {range}")));
        }
        if !(100..=10_000).contains(&self.rtc.rtx_history_ms) {
            return Err(invalid("rtc.rtx_history_ms", "must be 100-10000"));
        }
        if self.rtc.rtx_packets_video == 0 || self.rtc.rtx_packets_video > 10_000 {
            return Err(invalid("rtc.rtx_packets_video", "must be 1-10000"));
        }
        if self.rtc.rtx_packets_audio == 0 || self.rtc.rtx_packets_audio > 10_000 {
            return Err(invalid("rtc.rtx_packets_audio", "must be 1-10000"));
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
        for (name, text) in &self.room.presets {
            if name.is_empty() {
                return Err(invalid("room.presets", "empty preset name"));
            }
            arbor_actors::config::RoomPolicy::parse(text)
                .map_err(|e| invalid("room.presets", format!("preset `{name}`: {e}")))?;
        }
        if self.limit.max_signal_message_bytes < 4096 {
            return Err(invalid(
                "limit.max_signal_message_bytes",
                "must be at least 4096",
            ));
        }
        if !(1024..=1024 * 1024).contains(&self.limit.signal_buffer_bytes) {
            return Err(invalid("limit.signal_buffer_bytes", "must be 1024-1048576"));
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
        if self.limit.signal_rate > 0 && self.limit.signal_burst == 0 {
            return Err(invalid(
                "limit.signal_burst",
                "must be positive when limit.signal_rate is set",
            ));
        }
        for u in &self.webhook.urls {
            if !u.starts_with("http://") {
                return Err(invalid(
                    "webhook.urls",
                    format!("`{u}`: only http:// URLs are supported (terminate TLS in a proxy)"),
                ));
            }
            if crate::webhook::parse_http_url(u).is_none() {
                return Err(invalid("webhook.urls", format!("`{u}` is not a valid URL")));
            }
        }
        if !self.webhook.urls.is_empty() {
            self.webhook_key()?;
            if self.webhook.queue_size == 0 {
                return Err(invalid("webhook.queue_size", "must be positive"));
            }
            if self.webhook.max_attempts == 0 {
                return Err(invalid("webhook.max_attempts", "must be at least 1"));
            }
            if self.webhook.request_timeout_ms == 0 {
                return Err(invalid("webhook.request_timeout_ms", "must be positive"));
            }
        }
        match self.logging.level.as_str() {
            "trace" | "debug" | "info" | "warn" | "error" => {}
            other => return Err(invalid("logging.level", format!("unknown level `{other}`"))),
        }
        Ok(())
    }

    /// The API key and secret that sign webhooks: `webhook.api_key`, or the only key.
    pub fn webhook_key(&self) -> Result<(String, String), ConfigError> {
        if self.webhook.api_key.is_empty() {
            if self.keys.len() == 1 {
                if let Some((k, v)) = self.keys.iter().next() {
                    return Ok((k.clone(), v.clone()));
                }
            }
            return Err(invalid(
                "webhook.api_key",
                "required when several API keys are configured",
            ));
        }
        match self.keys.get(&self.webhook.api_key) {
            Some(secret) => Ok((self.webhook.api_key.clone(), secret.clone())),
            None => Err(invalid(
                "webhook.api_key",
                format!("`{}` is not one of `keys`", self.webhook.api_key),
            )),
        }
    }

    /// Room settings for the actors.
    pub fn room_settings(
        &self,
        node_id: String,
        events: arbor_actors::events::EventSink,
    ) -> arbor_actors::config::RoomSettings {
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
            last_n: self.room.last_n,
            audio_only_after: self.room.audio_only_after,
            // Validated by `validate`; an unparsable preset is left out rather than guessed.
            presets: self
                .room
                .presets
                .iter()
                .filter_map(|(name, text)| {
                    arbor_actors::config::RoomPolicy::parse(text)
                        .ok()
                        .map(|p| (name.clone(), p))
                })
                .collect(),
            node_id,
            region: self.region.clone(),
            enable_remote_unmute: self.room.enable_remote_unmute,
            scalable_codecs: self.rtc.rtp_mode,
            events,
        }
    }
}

/// Environment variables starting with `ARBOR_` that are not configuration: the test and
/// simulation tooling's own (`ARBOR_BIN`, `ARBOR_NODE_IP`, `ARBOR_CLIENT_IP`, `ARBOR_KEEP_TEST_DIR`,
/// `ARBOR_FAILOVER_BUDGET_MS` and everything under [`TOOLING_PREFIXES`]).
fn reserved_env(name: &str) -> bool {
    matches!(
        name,
        "ARBOR_BIN"
            | "ARBOR_NODE_IP"
            | "ARBOR_CLIENT_IP"
            | "ARBOR_KEEP_TEST_DIR"
            | "ARBOR_FAILOVER_BUDGET_MS"
    ) || TOOLING_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// Prefixes of the tooling's variables: e2e suite, simulators, load tool, WAN emulator, tests.
const TOOLING_PREFIXES: [&str; 6] = [
    "ARBOR_E2E_",
    "ARBOR_SIM_",
    "ARBOR_LOAD_",
    "ARBOR_WAN_",
    "ARBOR_TEST_",
    "ARBOR_BENCH_",
];

/// Config keys whose value is a map of strings (`keys`, `room.presets`) rather than a section.
const MAP_KEYS: [&str; 2] = ["keys", "room.presets"];

/// Every overridable key path (`rtc.udp_port`, ...) and its default value.
fn leaf_keys() -> Vec<(String, serde_yaml::Value)> {
    fn walk(prefix: &str, v: &serde_yaml::Value, out: &mut Vec<(String, serde_yaml::Value)>) {
        match v {
            serde_yaml::Value::Mapping(m) if !MAP_KEYS.contains(&prefix) => {
                for (k, child) in m {
                    if let Some(k) = k.as_str() {
                        let path = if prefix.is_empty() {
                            k.to_string()
                        } else {
                            format!("{prefix}.{k}")
                        };
                        walk(&path, child, out);
                    }
                }
            }
            other => out.push((prefix.to_string(), other.clone())),
        }
    }
    let mut out = Vec::new();
    if let Ok(v) = serde_yaml::to_value(Config::default()) {
        walk("", &v, &mut out);
    }
    out
}

/// The environment variable for a key path: `rtc.udp_port` → `ARBOR_RTC_UDP_PORT`.
pub fn env_name(path: &str) -> String {
    format!("ARBOR_{}", path.replace('.', "_").to_ascii_uppercase())
}

/// Parse an environment value into the YAML shape of the key it overrides.
fn env_value(
    default: &serde_yaml::Value,
    path: &str,
    raw: &str,
) -> Result<serde_yaml::Value, String> {
    use serde_yaml::Value;
    let scalar = |s: &str| -> Value {
        serde_yaml::from_str::<Value>(s).unwrap_or_else(|_| Value::String(s.to_string()))
    };
    if MAP_KEYS.contains(&path) {
        // `k1: s1, k2: s2`
        let mut m = serde_yaml::Mapping::new();
        for item in raw.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (k, v) = item
                .split_once(':')
                .ok_or_else(|| format!("expected `key: value[, key: value]`, got `{item}`"))?;
            m.insert(
                Value::String(k.trim().to_string()),
                Value::String(v.trim().to_string()),
            );
        }
        return Ok(Value::Mapping(m));
    }
    Ok(match default {
        Value::Sequence(_) => Value::Sequence(
            raw.split(',')
                .map(str::trim)
                .filter(|i| !i.is_empty())
                .map(|i| Value::String(i.to_string()))
                .collect(),
        ),
        Value::String(_) => Value::String(raw.to_string()),
        Value::Bool(_) => match raw.trim() {
            "true" | "1" | "yes" => Value::Bool(true),
            "false" | "0" | "no" => Value::Bool(false),
            other => return Err(format!("expected true or false, got `{other}`")),
        },
        Value::Number(_) => {
            let v = scalar(raw.trim());
            if !v.is_number() {
                return Err(format!("expected a number, got `{raw}`"));
            }
            v
        }
        _ => scalar(raw.trim()),
    })
}

impl Config {
    /// Build the configuration from (in rising precedence) the defaults, an optional YAML
    /// file (or the dev defaults), and `ARBOR_*` environment variables. `source` names the
    /// file in errors. Unknown keys and unknown `ARBOR_*` variables are errors that name them.
    pub fn load(
        file: Option<&Path>,
        dev: bool,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let file = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                Some((text, path))
            }
            None => None,
        };
        Self::from_sources(file.as_ref().map(|(t, p)| (t.as_str(), *p)), dev, env)
    }

    /// [`Config::load`] without the file system: `file` is the YAML text and the path to name
    /// in errors. Pure, so the fuzzer (`fuzz/fuzz_targets/config.rs`) can drive it.
    pub fn from_sources(
        file: Option<(&str, &Path)>,
        dev: bool,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut file_text = None;
        let (mut tree, source) = match file {
            Some((text, path)) => {
                file_text = Some(text.to_string());
                let v = if text.trim().is_empty() {
                    serde_yaml::Value::Mapping(Default::default())
                } else {
                    serde_yaml::from_str(text).map_err(|e| ConfigError::Parse {
                        path: path.to_path_buf(),
                        msg: e.to_string(),
                    })?
                };
                (v, path.to_path_buf())
            }
            None => (
                serde_yaml::Value::Mapping(Default::default()),
                PathBuf::from("<defaults>"),
            ),
        };
        if !tree.is_mapping() {
            return Err(ConfigError::Parse {
                path: source,
                msg: "the top level must be a mapping of keys".into(),
            });
        }
        let leaves = leaf_keys();
        let mut applied = Vec::new();
        let mut env: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("ARBOR_") && !reserved_env(k))
            .collect();
        env.sort();
        for (var, raw) in env {
            let Some((path, default)) = leaves.iter().find(|(p, _)| env_name(p) == var) else {
                let known: Vec<String> = leaves.iter().map(|(p, _)| env_name(p)).collect();
                return Err(ConfigError::Env {
                    var,
                    msg: format!("not a configuration key (known: {})", known.join(", ")),
                });
            };
            let value = env_value(default, path, &raw).map_err(|msg| ConfigError::Env {
                var: var.clone(),
                msg: format!("invalid value for `{path}`: {msg}"),
            })?;
            let mut node = &mut tree;
            let parts: Vec<&str> = path.split('.').collect();
            for (i, part) in parts.iter().enumerate() {
                let map = match node {
                    serde_yaml::Value::Mapping(m) => m,
                    _ => {
                        return Err(ConfigError::Env {
                            var: var.clone(),
                            msg: format!(
                                "`{}` in the config file is not a section",
                                parts[..i].join(".")
                            ),
                        })
                    }
                };
                let key = serde_yaml::Value::String(part.to_string());
                if i + 1 == parts.len() {
                    map.insert(key, value.clone());
                    break;
                }
                node = map
                    .entry(key)
                    .or_insert_with(|| serde_yaml::Value::Mapping(Default::default()));
            }
            applied.push((var, path.clone()));
        }
        // Deserialize from text, not from the tree: serde_yaml then names the key path in
        // errors (`rtc.udp_port: invalid value ...`). Line numbers refer to the file only
        // when no variable changed it.
        let text = match (&file_text, applied.is_empty()) {
            (Some(t), true) => t.clone(),
            _ => serde_yaml::to_string(&tree).map_err(|e| ConfigError::Parse {
                path: source.clone(),
                msg: e.to_string(),
            })?,
        };
        let parsed: Result<Config, _> = if text.trim().is_empty() {
            Ok(Config::default())
        } else {
            serde_yaml::from_str(&text)
        };
        let mut cfg = parsed.map_err(|e| {
            let mut msg = e.to_string();
            // Say which variable set a key whose value is wrong.
            if let Some((var, path)) = applied
                .iter()
                .find(|(_, p)| msg.starts_with(&format!("{p}:")) || msg.contains(&format!("`{p}`")))
            {
                msg = format!("{msg} (set by {var} for `{path}`)");
            }
            ConfigError::Parse {
                path: source.clone(),
                msg,
            }
        })?;
        if dev && cfg.keys.is_empty() && cfg.key_file.is_none() {
            cfg.keys.insert("devkey".into(), "secret".into());
        }
        Ok(cfg)
    }

    /// True when the environment holds configuration (`ARBOR_*` variables that are not the
    /// tooling's own).
    pub fn env_has_config(env: impl IntoIterator<Item = (String, String)>) -> bool {
        env.into_iter()
            .any(|(k, _)| k.starts_with("ARBOR_") && !reserved_env(&k))
    }

    /// Every supported environment variable with its key path.
    #[cfg(test)]
    pub fn env_variables() -> Vec<(String, String)> {
        leaf_keys()
            .into_iter()
            .map(|(p, _)| (env_name(&p), p))
            .collect()
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

    fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn env_overrides_every_kind_of_key() {
        let c = Config::load(
            None,
            false,
            env(&[
                ("ARBOR_PORT", "9000"),
                ("ARBOR_RTC_UDP_PORT", "9002"),
                ("ARBOR_RTC_NODE_IP", "10.1.2.3"),
                ("ARBOR_KEYS", "k1: s1, k2: s2"),
                ("ARBOR_ROOM_EMPTY_TIMEOUT", "12"),
                ("ARBOR_ROOM_AUTO_CREATE", "false"),
                ("ARBOR_LIMIT_SIGNAL_RATE", "5"),
                (
                    "ARBOR_WEBHOOK_URLS",
                    "http://127.0.0.1:1/a, http://127.0.0.1:2/b",
                ),
                ("ARBOR_WEBHOOK_API_KEY", "k1"),
                ("ARBOR_LOGGING_LEVEL", "debug"),
                ("ARBOR_REGION", "eu"),
                // The tooling's own variables are ignored.
                ("ARBOR_BIN", "/x"),
                ("ARBOR_NODE_IP", "10.200.0.1"),
                ("ARBOR_E2E_IN_NETNS", "1"),
                ("ARBOR_LOAD_BIN", "/y"),
                ("ARBOR_WAN_BIN", "/z"),
                ("PATH", "/bin"),
            ]),
        )
        .unwrap();
        assert_eq!(c.port, 9000);
        assert_eq!(c.rtc.udp_port, 9002);
        assert_eq!(c.rtc.node_ip, Some("10.1.2.3".parse().unwrap()));
        assert_eq!(c.keys.len(), 2);
        assert_eq!(c.keys["k2"], "s2");
        assert_eq!(c.room.empty_timeout, 12);
        assert!(!c.room.auto_create);
        assert_eq!(c.limit.signal_rate, 5);
        assert_eq!(c.webhook.urls.len(), 2);
        assert_eq!(c.logging.level, "debug");
        assert_eq!(c.region, "eu");
        c.validate().unwrap();
        assert_eq!(c.webhook_key().unwrap().0, "k1");
    }

    #[test]
    fn env_overrides_the_file() {
        let dir = std::env::temp_dir().join(format!("arbor-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.yaml");
        std::fs::write(&f, "port: 7000\nrtc:\n  udp_port: 7002\nkeys:\n  a: b\n").unwrap();
        let c = Config::load(Some(&f), false, env(&[("ARBOR_RTC_UDP_PORT", "7100")])).unwrap();
        assert_eq!(c.port, 7000);
        assert_eq!(c.rtc.udp_port, 7100);
        assert_eq!(c.keys["a"], "b");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn env_errors_name_the_variable() {
        let e = Config::load(None, true, env(&[("ARBOR_BOGUS", "1")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("ARBOR_BOGUS") && e.contains("not a configuration key"),
            "{e}"
        );
        let e = Config::load(None, true, env(&[("ARBOR_PORT", "abc")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("ARBOR_PORT") && e.contains("`port`"), "{e}");
        let e = Config::load(None, true, env(&[("ARBOR_PORT", "70000")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("port") && e.contains("ARBOR_PORT"), "{e}");
        let e = Config::load(None, true, env(&[("ARBOR_KEYS", "nocolon")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("ARBOR_KEYS"), "{e}");
    }

    #[test]
    fn webhook_validation() {
        let mut c = Config::dev();
        c.webhook.urls = vec!["https://example.invalid/x".into()];
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("webhook.urls"));
        c.webhook.urls = vec!["http://127.0.0.1:9/hook".into()];
        c.validate().unwrap();
        c.keys.insert("k2".into(), "s2".into());
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("webhook.api_key"));
        c.webhook.api_key = "nope".into();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("webhook.api_key"));
        c.webhook.api_key = "k2".into();
        c.validate().unwrap();
    }

    #[test]
    fn room_presets_from_file_and_env_are_validated() {
        let c = Config::from_yaml(
            "keys:\n  k: s\nroom:\n  presets:\n    webinar: \"last_n=4 audio_only_after=50\"\n",
        )
        .unwrap();
        c.validate().unwrap();
        let s = c.room_settings("n".into(), Default::default());
        assert_eq!(s.presets["webinar"].last_n, 4);
        assert_eq!(s.presets["webinar"].audio_only_after, 50);
        // Off by default: no preset, no policy.
        assert_eq!((s.last_n, s.audio_only_after), (0, 0));
        let c = Config::load(
            None,
            true,
            env(&[("ARBOR_ROOM_PRESETS", "a: last_n=2, b: audio_only_after=3")]),
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.room.presets.len(), 2);
        let mut c = Config::dev();
        c.room.presets.insert("bad".into(), "last_n=x".into());
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("room.presets") && e.contains("bad"), "{e}");
    }

    #[test]
    fn every_key_is_documented_in_the_sample() {
        let sample = include_str!("../deploy/config-sample.yaml");
        for (var, path) in Config::env_variables() {
            let leaf = path.rsplit('.').next().unwrap();
            assert!(
                sample.contains(&format!("{leaf}:")),
                "`{path}` is not documented in deploy/config-sample.yaml"
            );
            assert!(
                sample.contains(&var),
                "{var} is not documented in the sample"
            );
        }
    }

    #[test]
    fn media_shards_are_bounded_and_their_ports_checked() {
        let c = Config::dev();
        assert_eq!((c.rtc.shards, c.media_shards()), (1, 1));
        let c = Config::load(None, true, env(&[("ARBOR_RTC_SHARDS", "2")])).unwrap();
        c.validate().unwrap();
        assert_eq!(c.media_shards(), 2);
        // 0 = one per core.
        let mut c = Config::dev();
        c.rtc.shards = 0;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(c.media_shards(), cores.min(MAX_SHARDS));
        let mut c = Config::dev();
        c.rtc.shards = 65;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("`rtc.shards`"));
        // Shard ports udp_port + i must not reach the ICE-TCP or HTTP port, nor pass 65535.
        let mut c = Config::dev();
        (c.rtc.udp_port, c.rtc.tcp_port, c.rtc.shards) = (9000, 9003, 4);
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("`rtc.tcp_port`") && e.contains("9000-9003"),
            "{e}"
        );
        c.rtc.tcp_port = 9004;
        c.validate().unwrap();
        c.port = 9002;
        assert!(c.validate().unwrap_err().to_string().contains("`port`"));
        let mut c = Config::dev();
        (c.rtc.udp_port, c.rtc.shards) = (65535, 2);
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("`rtc.udp_port`"));
        c.rtc.shards = 1;
        c.validate().unwrap();
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
