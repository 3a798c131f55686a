//! The plain relay: the floor for any SFU on this machine.
//!
//! It does the least work an SFU must do per packet and nothing else: receive an SRTP packet
//! over UDP, decrypt it once (AEAD_AES_128_GCM, RFC 7714), and for every subscriber copy it,
//! encrypt it with that subscriber's key and send it. No ICE, no DTLS handshake, no RTCP, no
//! congestion control, no signalling beyond a one-datagram `JOIN`. Arbor's CPU per forwarded
//! packet divided by the relay's is therefore "what everything except crypto and syscalls
//! costs".
//!
//! Keys are derived from a run seed and the participant id (a stand-in for a DTLS-SRTP
//! handshake, whose cost is per connection, not per packet):
//!
//! ```text
//!  publisher ──SRTP(key(0))──►  relay  ──SRTP(key(i))──► subscriber i   (one copy each)
//!  subscriber i ──"JOIN" + i──►  relay                                  (registers its address)
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};
use tokio::net::UdpSocket;
use tokio::sync::watch;

use crate::clip::{vp8_payloads, Clip};
use crate::stats::{Registry, TrackRecv};
use crate::LoadError;

/// Bytes of the GCM authentication tag appended to each SRTP packet.
pub const TAG: usize = 16;
/// Largest datagram handled.
pub const MAX_DATAGRAM: usize = 1500;
/// Most subscribers the relay accepts (bounds its table).
pub const MAX_SUBSCRIBERS: usize = 10_000;
/// Payload bytes per video RTP packet (before the VP8 descriptor and SRTP tag).
pub const VIDEO_MTU: usize = 1100;
/// The datagram a subscriber sends to register: `JOIN` + its id (u32, big endian).
pub const JOIN: &[u8; 4] = b"JOIN";

/// SRTP AEAD_AES_128_GCM context of one sender or receiver (one key, many SSRCs).
pub struct Srtp {
    key: LessSafeKey,
    salt: [u8; 12],
    /// Per SSRC: (rollover counter, highest sequence number).
    roc: HashMap<u32, (u32, u16)>,
}

impl Srtp {
    /// The context of participant `id` in a run seeded with `seed` (publisher is id 0).
    pub fn for_participant(seed: u64, id: u32) -> Self {
        let mut m = Vec::with_capacity(12);
        m.extend_from_slice(&seed.to_be_bytes());
        m.extend_from_slice(&id.to_be_bytes());
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &m);
        let d = d.as_ref();
        let mut salt = [0u8; 12];
        salt.copy_from_slice(&d[16..28]);
        // 16 bytes is always a valid AES-128 key.
        let key = UnboundKey::new(&AES_128_GCM, &d[..16]).map(LessSafeKey::new);
        Self {
            key: key.unwrap_or_else(|_| unreachable_key()),
            salt,
            roc: HashMap::new(),
        }
    }

    fn nonce(&self, ssrc: u32, roc: u32, seq: u16) -> Nonce {
        let mut iv = [0u8; 12];
        iv[2..6].copy_from_slice(&ssrc.to_be_bytes());
        iv[6..10].copy_from_slice(&roc.to_be_bytes());
        iv[10..12].copy_from_slice(&seq.to_be_bytes());
        for (a, b) in iv.iter_mut().zip(self.salt) {
            *a ^= b;
        }
        Nonce::assume_unique_for_key(iv)
    }

    /// Rollover counter for `seq` of `ssrc` (RFC 3711 §3.3.1 estimate), updating the state.
    fn roc_for(&mut self, ssrc: u32, seq: u16) -> u32 {
        let e = self.roc.entry(ssrc).or_insert((0, seq));
        let (roc, hi) = *e;
        let guess = if hi > 0xc000 && seq < 0x4000 {
            roc.wrapping_add(1)
        } else if hi < 0x4000 && seq > 0xc000 {
            roc.wrapping_sub(1)
        } else {
            roc
        };
        if guess == roc.wrapping_add(1) || (guess == roc && seq > hi) {
            *e = (guess, seq);
        }
        guess
    }

    /// Encrypts the RTP packet in `buf` (header + payload) in place and appends the tag.
    pub fn protect(&mut self, buf: &mut Vec<u8>) -> Result<(), LoadError> {
        let h = rtp_header_len(buf).ok_or_else(|| LoadError::Relay("not RTP".into()))?;
        let (ssrc, seq) = ssrc_seq(buf);
        let roc = self.roc_for(ssrc, seq);
        let nonce = self.nonce(ssrc, roc, seq);
        let (hdr, payload) = buf.split_at_mut(h);
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(&*hdr), payload)
            .map_err(|_| LoadError::Relay("seal failed".into()))?;
        buf.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Decrypts and authenticates `buf` in place; returns the plaintext length.
    pub fn unprotect(&mut self, buf: &mut [u8]) -> Result<usize, LoadError> {
        let h = rtp_header_len(buf).ok_or_else(|| LoadError::Relay("not RTP".into()))?;
        if buf.len() < h + TAG {
            return Err(LoadError::Relay("short SRTP packet".into()));
        }
        let (ssrc, seq) = ssrc_seq(buf);
        let roc = self.roc_for(ssrc, seq);
        let nonce = self.nonce(ssrc, roc, seq);
        let (hdr, payload) = buf.split_at_mut(h);
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(&*hdr), payload)
            .map_err(|_| LoadError::Relay("SRTP authentication failed".into()))?;
        Ok(h + plain.len())
    }
}

#[cold]
fn unreachable_key() -> LessSafeKey {
    // AES_128_GCM accepts every 16-byte key; this exists only so no `unwrap` is needed.
    LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &[0u8; 16]).expect("16-byte AES key"))
}

/// Length of the RTP header (fixed part, CSRCs, extension), or `None` if `b` is not RTP.
pub fn rtp_header_len(b: &[u8]) -> Option<usize> {
    if b.len() < 12 || b[0] >> 6 != 2 {
        return None;
    }
    let mut h = 12 + 4 * (b[0] & 0x0f) as usize;
    if b[0] & 0x10 != 0 {
        let ext = b.get(h + 2..h + 4)?;
        h += 4 + 4 * u16::from_be_bytes([ext[0], ext[1]]) as usize;
    }
    (h <= b.len()).then_some(h)
}

fn ssrc_seq(b: &[u8]) -> (u32, u16) {
    (
        u32::from_be_bytes([b[8], b[9], b[10], b[11]]),
        u16::from_be_bytes([b[2], b[3]]),
    )
}

/// Runs the relay on `bind` until the process is killed. `seed` must match the clients'.
pub async fn serve(bind: SocketAddr, seed: u64) -> Result<(), LoadError> {
    let sock = UdpSocket::bind(bind)
        .await
        .map_err(|e| LoadError::Relay(format!("bind {bind}: {e}")))?;
    let mut publisher = Srtp::for_participant(seed, 0);
    let mut subs: Vec<(SocketAddr, Srtp)> = Vec::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut out = Vec::with_capacity(MAX_DATAGRAM + TAG);
    loop {
        let (n, from) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(_) => continue,
        };
        let pkt = &mut buf[..n];
        if n == 8 && &pkt[..4] == JOIN {
            let id = u32::from_be_bytes([pkt[4], pkt[5], pkt[6], pkt[7]]);
            if id != 0 && subs.len() < MAX_SUBSCRIBERS && !subs.iter().any(|(a, _)| *a == from) {
                subs.push((from, Srtp::for_participant(seed, id)));
            }
            continue;
        }
        let Ok(len) = publisher.unprotect(pkt) else {
            continue;
        };
        for (addr, ctx) in subs.iter_mut() {
            out.clear();
            out.extend_from_slice(&buf[..len]);
            if ctx.protect(&mut out).is_ok() {
                // Never block the loop on one subscriber: a full socket buffer drops the copy.
                let _ = sock.try_send_to(&out, *addr);
            }
        }
    }
}

/// [`serve`] with Arbor's batched I/O ([`arbor_actors::media::batch_io`]): one `recvmmsg`
/// per wake-up, every copy of every packet read queued in one batch, one `sendmmsg` (with UDP
/// GSO for runs to one destination) per batch. The per-packet work (decrypt once, encrypt per
/// subscriber) is the same as `serve`'s; only the system calls differ, so comparing Arbor
/// (which batches) against this keeps the baseline honest.
pub async fn serve_batched(bind: SocketAddr, seed: u64) -> Result<(), LoadError> {
    use arbor_actors::media::batch_io::{gso_supported, RxBatch, TxBatch};
    let sock = UdpSocket::bind(bind)
        .await
        .map_err(|e| LoadError::Relay(format!("bind {bind}: {e}")))?;
    let mut publisher = Srtp::for_participant(seed, 0);
    let mut subs: Vec<(SocketAddr, Srtp)> = Vec::new();
    let mut rx = RxBatch::new(64);
    let mut tx = TxBatch::new(1024, gso_supported(&sock));
    let mut pkt = vec![0u8; MAX_DATAGRAM];
    let mut out = Vec::with_capacity(MAX_DATAGRAM + TAG);
    loop {
        if sock.readable().await.is_err() {
            continue;
        }
        let n = match sock.try_io(tokio::io::Interest::READABLE, || rx.recv(&sock)) {
            Ok(n) => n,
            Err(_) => continue,
        };
        for i in 0..n {
            let Some((d, from)) = rx.get(i) else {
                continue;
            };
            if d.len() == 8 && &d[..4] == JOIN {
                let id = u32::from_be_bytes([d[4], d[5], d[6], d[7]]);
                if id != 0 && subs.len() < MAX_SUBSCRIBERS && !subs.iter().any(|(a, _)| *a == from)
                {
                    subs.push((from, Srtp::for_participant(seed, id)));
                }
                continue;
            }
            let Some(buf) = pkt.get_mut(..d.len()) else {
                continue;
            };
            buf.copy_from_slice(d);
            let Ok(len) = publisher.unprotect(buf) else {
                continue;
            };
            for (addr, ctx) in subs.iter_mut() {
                out.clear();
                out.extend_from_slice(&pkt[..len]);
                if ctx.protect(&mut out).is_ok() {
                    if tx.is_full() {
                        tx.flush(&sock);
                    }
                    tx.push(*addr, &out);
                }
            }
        }
        tx.flush(&sock);
    }
}

/// Publishes the clip to the relay (video SSRC 1, audio SSRC 2) until `stop`.
pub async fn publish(
    relay: SocketAddr,
    bind_ip: std::net::IpAddr,
    seed: u64,
    clip: Clip,
    mut stop: watch::Receiver<bool>,
) -> Result<(), LoadError> {
    let sock = Arc::new(
        UdpSocket::bind((bind_ip, 0))
            .await
            .map_err(|e| LoadError::Relay(format!("bind: {e}")))?,
    );
    let mut ctx = Srtp::for_participant(seed, 0);
    let mut vtick = tokio::time::interval(clip.frame_interval);
    let mut atick = tokio::time::interval(clip.audio_interval);
    vtick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    atick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let (mut vseq, mut aseq, mut vts, mut ats) = (0u16, 0u16, 0u32, 0u32);
    let (mut vi, mut ai) = (0usize, 0usize);
    let vstep = (clip.frame_interval.as_secs_f64() * 90_000.0) as u32;
    let astep = (clip.audio_interval.as_secs_f64() * 48_000.0) as u32;
    let mut pkt = Vec::with_capacity(MAX_DATAGRAM);
    loop {
        tokio::select! {
            _ = stop.changed() => if *stop.borrow() { return Ok(()) },
            _ = vtick.tick() => {
                let frame = &clip.video[vi % clip.video.len()];
                vi += 1;
                let parts = vp8_payloads(frame, VIDEO_MTU);
                let last = parts.len().saturating_sub(1);
                for (i, p) in parts.iter().enumerate() {
                    rtp(&mut pkt, 96, i == last, vseq, vts, 1, p);
                    vseq = vseq.wrapping_add(1);
                    ctx.protect(&mut pkt)?;
                    let _ = sock.send_to(&pkt, relay).await;
                }
                vts = vts.wrapping_add(vstep);
            }
            _ = atick.tick() => {
                let p = &clip.audio[ai % clip.audio.len()];
                ai += 1;
                rtp(&mut pkt, 111, true, aseq, ats, 2, p);
                aseq = aseq.wrapping_add(1);
                ats = ats.wrapping_add(astep);
                ctx.protect(&mut pkt)?;
                let _ = sock.send_to(&pkt, relay).await;
            }
        }
    }
}

fn rtp(buf: &mut Vec<u8>, pt: u8, marker: bool, seq: u16, ts: u32, ssrc: u32, payload: &[u8]) {
    buf.clear();
    buf.push(0x80);
    buf.push(pt | if marker { 0x80 } else { 0 });
    buf.extend_from_slice(&seq.to_be_bytes());
    buf.extend_from_slice(&ts.to_be_bytes());
    buf.extend_from_slice(&ssrc.to_be_bytes());
    buf.extend_from_slice(payload);
}

/// One relay subscriber: registers, then decrypts and accounts every packet until `stop`.
/// Join time is JOIN → first packet; the JOIN is repeated every 500 ms until media flows.
pub async fn subscribe(
    relay: SocketAddr,
    bind_ip: std::net::IpAddr,
    seed: u64,
    id: u32,
    reg: Arc<Registry>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), LoadError> {
    let sock = UdpSocket::bind((bind_ip, 0))
        .await
        .map_err(|e| LoadError::Relay(format!("bind: {e}")))?;
    let mut ctx = Srtp::for_participant(seed, id);
    let mut join = Vec::from(&JOIN[..]);
    join.extend_from_slice(&id.to_be_bytes());
    let started = Instant::now();
    let mut tracks: HashMap<u32, TrackRecv> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut joined = false;
    let mut retry = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = stop.changed() => if *stop.borrow() { return Ok(()) },
            _ = retry.tick(), if !joined => {
                if started.elapsed() > crate::lk::JOIN_TIMEOUT {
                    reg.join_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return Err(LoadError::Join("relay sent nothing".into()));
                }
                let _ = sock.send_to(&join, relay).await;
            }
            r = sock.recv_from(&mut buf) => {
                let Ok((n, _)) = r else { continue };
                let Ok(len) = ctx.unprotect(&mut buf[..n]) else { continue };
                if len < 12 { continue }
                let (ssrc, seq) = ssrc_seq(&buf);
                let ts = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
                let clock = if buf[1] & 0x7f == 96 { 90_000 } else { 48_000 };
                tracks
                    .entry(ssrc)
                    .or_insert_with(|| TrackRecv::new(reg.track(), clock))
                    .on_packet(Instant::now(), seq, ts);
                if !joined {
                    joined = true;
                    reg.join_time(started.elapsed());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn srtp_round_trip_and_tamper_detection() {
        let mut tx = Srtp::for_participant(7, 3);
        let mut rx = Srtp::for_participant(7, 3);
        let mut other = Srtp::for_participant(7, 4);
        let mut p = Vec::new();
        rtp(&mut p, 96, true, 65535, 1234, 42, b"hello vp8");
        let plain = p.clone();
        tx.protect(&mut p).unwrap();
        assert_eq!(p.len(), plain.len() + TAG);
        assert_ne!(&p[12..plain.len()], &plain[12..]);
        let mut wrong = p.clone();
        assert!(other.unprotect(&mut wrong).is_err());
        let n = rx.unprotect(&mut p).unwrap();
        assert_eq!(&p[..n], &plain[..]);
        // After the wrap, the rollover counter advances on both sides.
        let mut q = Vec::new();
        rtp(&mut q, 96, true, 0, 1234, 42, b"next");
        let plain_q = q.clone();
        tx.protect(&mut q).unwrap();
        let n = rx.unprotect(&mut q).unwrap();
        assert_eq!(&q[..n], &plain_q[..]);
    }

    #[test]
    fn header_parsing_rejects_garbage() {
        assert_eq!(rtp_header_len(&[]), None);
        assert_eq!(rtp_header_len(&[0u8; 12]), None);
        let mut p = vec![0x90u8; 12]; // extension bit set but no extension
        p[0] = 0x90;
        assert_eq!(rtp_header_len(&p), None);
        let mut s = Srtp::for_participant(1, 1);
        assert!(s.unprotect(&mut [0x80u8; 20]).is_err());
    }
}
