//! Batched UDP I/O: many datagrams per system call.
//!
//! An SFU sends far more datagrams than it receives (one publisher packet becomes N subscriber
//! packets), and a `sendto` per datagram spends a good part of each packet's budget entering
//! and leaving the kernel. This module amortises that:
//!
//! * [`TxBatch`] collects the datagrams one engine step produces in one reusable buffer (an
//!   arena: no allocation per packet) and [`TxBatch::flush`]es them with `sendmmsg(2)`: up to
//!   [`SENDMMSG_MAX`] messages per call.
//! * **UDP GSO** (generic segmentation offload, `UDP_SEGMENT`, Linux ≥ 4.18): a *run* of
//!   datagrams to the same destination whose sizes are equal (the last may be shorter) goes to
//!   the kernel as *one* message — one buffer plus a segment size — and is cut into datagrams
//!   below the socket layer, so routing, netfilter and the socket bookkeeping run once per run
//!   instead of once per datagram. Runs form when one subscriber gets several packets in one
//!   step (a video frame's packets, a burst released by the pacer). Support is detected once per
//!   socket ([`gso_supported`]); if a send with a segment size fails with `EIO` (a device
//!   without checksum offload), GSO is switched off for the batch and the run is re-sent as
//!   single datagrams, as quinn-udp does.
//! * [`RxBatch`] reads up to its capacity of datagrams with one `recvmmsg(2)` into reusable
//!   buffers.
//!
//! Both are plain buffers plus the system calls; they never block (`MSG_DONTWAIT`). A datagram
//! the kernel refuses (socket buffer full, ICMP error pending) is dropped and counted in
//! [`FlushStats::dropped`], exactly like `try_send_to` would. On other systems than Linux the
//! same API falls back to one `try_send_to`/`try_recv_from` per datagram.
//!
//! ```text
//!  engine step ──transmit──► TxBatch arena [d0|d1|d2 d3 d4|d5]      (d2..d4: same dest, same size)
//!                                 │ flush
//!                                 ▼
//!                 sendmmsg([ msg(d0), msg(d1), msg(d2..d4, UDP_SEGMENT=len), msg(d5) ])
//! ```

use std::io;
use std::net::SocketAddr;

use tokio::net::UdpSocket;

/// Largest datagram accepted into a batch (bigger ones are refused and counted as drops).
pub const MAX_DATAGRAM: usize = 2048;
/// Most messages handed to one `sendmmsg` call (the kernel's `UIO_MAXIOV` is 1024).
pub const SENDMMSG_MAX: usize = 256;
/// Most datagrams one GSO message carries (the kernel's `UDP_MAX_SEGMENTS` is 64).
pub const GSO_MAX_SEGMENTS: usize = 64;
/// Most payload bytes one GSO message carries (an IP packet's 64 KiB limit, minus headers).
pub const GSO_MAX_BYTES: usize = 65_000;

/// What one [`TxBatch::flush`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FlushStats {
    /// Datagrams the kernel accepted.
    pub sent: usize,
    /// Bytes of those datagrams.
    pub bytes: usize,
    /// Datagrams dropped (socket buffer full, ICMP error, refused by the kernel).
    pub dropped: usize,
    /// System calls made.
    pub syscalls: usize,
    /// Messages that carried more than one datagram (GSO).
    pub gso_messages: usize,
}

/// One queued datagram: where it goes and where its bytes are in the arena.
#[derive(Debug, Clone, Copy)]
struct Item {
    dest: SocketAddr,
    start: usize,
    len: usize,
}

/// Outgoing datagrams of one engine step, sent together by [`TxBatch::flush`].
///
/// Capacity is fixed at construction (`max_datagrams` datagrams of up to [`MAX_DATAGRAM`]
/// bytes); [`TxBatch::push`] reports when the batch is full so the caller flushes first.
pub struct TxBatch {
    arena: Vec<u8>,
    items: Vec<Item>,
    max_datagrams: usize,
    /// Whether runs to one destination may be sent as one GSO message.
    gso: bool,
    #[cfg(target_os = "linux")]
    sys: linux::SendScratch,
}

impl std::fmt::Debug for TxBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxBatch")
            .field("queued", &self.items.len())
            .field("max_datagrams", &self.max_datagrams)
            .field("gso", &self.gso)
            .finish()
    }
}

impl TxBatch {
    /// A batch for up to `max_datagrams` datagrams (at least 1); `gso` allows GSO messages
    /// (pass [`gso_supported`] of the socket).
    pub fn new(max_datagrams: usize, gso: bool) -> Self {
        let max_datagrams = max_datagrams.max(1);
        TxBatch {
            arena: Vec::with_capacity(max_datagrams * MAX_DATAGRAM),
            items: Vec::with_capacity(max_datagrams),
            max_datagrams,
            gso,
            #[cfg(target_os = "linux")]
            sys: linux::SendScratch::new(max_datagrams.min(SENDMMSG_MAX)),
        }
    }

    /// Whether GSO is (still) in use.
    pub fn gso(&self) -> bool {
        self.gso
    }

    /// Number of datagrams queued.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Whether the batch holds its maximum number of datagrams (flush before pushing more).
    pub fn is_full(&self) -> bool {
        self.items.len() >= self.max_datagrams
    }

    /// Queue one datagram. Returns `false` (nothing queued) if the batch is full or the
    /// datagram is empty or larger than [`MAX_DATAGRAM`].
    pub fn push(&mut self, dest: SocketAddr, contents: &[u8]) -> bool {
        if self.is_full() || contents.is_empty() || contents.len() > MAX_DATAGRAM {
            return false;
        }
        let start = self.arena.len();
        self.arena.extend_from_slice(contents);
        self.items.push(Item {
            dest,
            start,
            len: contents.len(),
        });
        true
    }

    /// Send everything queued (never blocks) and empty the batch.
    pub fn flush(&mut self, socket: &UdpSocket) -> FlushStats {
        let stats = if self.items.is_empty() {
            FlushStats::default()
        } else {
            self.send_all(socket)
        };
        self.items.clear();
        self.arena.clear();
        stats
    }

    /// The run of datagrams starting at item `i` that can travel as one message: same
    /// destination, same size (the last may be shorter), within the GSO limits. Without GSO,
    /// always one datagram. Returns the number of items in the run.
    fn run_at(&self, i: usize) -> usize {
        if !self.gso {
            return 1;
        }
        let first = self.items[i];
        let mut n = 1;
        let mut bytes = first.len;
        while let Some(next) = self.items.get(i + n) {
            if n >= GSO_MAX_SEGMENTS
                || next.dest != first.dest
                || next.len > first.len
                || bytes + next.len > GSO_MAX_BYTES
            {
                break;
            }
            // Arena order is push order, so consecutive items are adjacent bytes.
            debug_assert_eq!(next.start, first.start + bytes);
            n += 1;
            bytes += next.len;
            if next.len < first.len {
                break; // a shorter datagram can only end a run
            }
        }
        n
    }

    #[cfg(target_os = "linux")]
    fn send_all(&mut self, socket: &UdpSocket) -> FlushStats {
        use std::os::fd::AsRawFd;
        let fd = socket.as_raw_fd();
        let v6 = socket.local_addr().is_ok_and(|a| a.is_ipv6());
        let mut stats = FlushStats::default();
        let mut i = 0;
        while i < self.items.len() {
            // Build up to SENDMMSG_MAX messages from item i on.
            let mut runs = [0usize; SENDMMSG_MAX];
            let mut m = 0;
            let mut j = i;
            self.sys.clear();
            while j < self.items.len() && m < self.sys.capacity() {
                let n = self.run_at(j);
                let first = self.items[j];
                let bytes: usize = self.items[j..j + n].iter().map(|it| it.len).sum();
                let seg = (n > 1).then_some(first.len);
                self.sys.add(
                    &self.arena[first.start..first.start + bytes],
                    first.dest,
                    v6,
                    seg,
                );
                runs[m] = n;
                m += 1;
                j += n;
            }
            let r = self.sys.sendmmsg(fd);
            stats.syscalls += 1;
            match r {
                Ok(0) => {
                    // Not expected for a non-empty vector; never loop on it.
                    stats.dropped += runs[0];
                    i += runs[0];
                }
                Ok(done) => {
                    // `done` ≥ 1 messages went out: account them and continue after them.
                    for &n in &runs[..done.min(m)] {
                        let bytes: usize = self.items[i..i + n].iter().map(|it| it.len).sum();
                        stats.sent += n;
                        stats.bytes += bytes;
                        if n > 1 {
                            stats.gso_messages += 1;
                        }
                        i += n;
                    }
                }
                Err(e) => {
                    // The first message failed; the rest were not tried.
                    let n = runs[0];
                    match e.raw_os_error() {
                        // GSO refused by the device: turn it off and retry these datagrams
                        // one by one.
                        Some(libc::EIO) | Some(libc::EINVAL) if n > 1 => {
                            tracing::warn!(error = %e, "UDP GSO send failed; GSO disabled");
                            self.gso = false;
                        }
                        // Socket buffer full: everything left would fail the same way now.
                        Some(libc::EAGAIN) | Some(libc::ENOBUFS) => {
                            stats.dropped += self.items.len() - i;
                            break;
                        }
                        // ICMP error from an earlier send, unreachable destination, ...: this
                        // message is lost, the others may go.
                        _ => {
                            stats.dropped += n;
                            i += n;
                        }
                    }
                }
            }
        }
        stats
    }

    #[cfg(not(target_os = "linux"))]
    fn send_all(&mut self, socket: &UdpSocket) -> FlushStats {
        let mut stats = FlushStats::default();
        for it in &self.items {
            stats.syscalls += 1;
            match socket.try_send_to(&self.arena[it.start..it.start + it.len], it.dest) {
                Ok(_) => {
                    stats.sent += 1;
                    stats.bytes += it.len;
                }
                Err(_) => stats.dropped += 1,
            }
        }
        stats
    }
}

/// Whether the kernel supports UDP GSO on `socket` (Linux: `getsockopt(UDP_SEGMENT)` works).
pub fn gso_supported(socket: &UdpSocket) -> bool {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        linux::gso_supported(socket.as_raw_fd())
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = socket;
        false
    }
}

/// Datagrams read by one [`RxBatch::recv`]: reusable buffers, one per datagram.
pub struct RxBatch {
    bufs: Vec<u8>,
    lens: Vec<(usize, Option<SocketAddr>)>,
    count: usize,
    #[cfg(target_os = "linux")]
    sys: linux::RecvScratch,
}

impl std::fmt::Debug for RxBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RxBatch")
            .field("capacity", &self.lens.len())
            .field("count", &self.count)
            .finish()
    }
}

impl RxBatch {
    /// Room for `capacity` datagrams (at least 1) of up to [`MAX_DATAGRAM`] bytes.
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        RxBatch {
            bufs: vec![0u8; capacity * MAX_DATAGRAM],
            lens: vec![(0, None); capacity],
            count: 0,
            #[cfg(target_os = "linux")]
            sys: linux::RecvScratch::new(capacity),
        }
    }

    /// Read as many datagrams as are waiting, up to the capacity, without blocking. Returns
    /// how many were read; `Err(WouldBlock)` when none was waiting. Truncated datagrams (larger
    /// than [`MAX_DATAGRAM`]) are skipped.
    pub fn recv(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        self.count = 0;
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            let n = self.sys.recvmmsg(socket.as_raw_fd(), &mut self.bufs)?;
            for (i, slot) in self.lens.iter_mut().enumerate().take(n) {
                *slot = self.sys.result(i);
            }
            self.count = n;
        }
        #[cfg(not(target_os = "linux"))]
        {
            let (len, from) = socket.try_recv_from(&mut self.bufs[..MAX_DATAGRAM])?;
            self.lens[0] = (len, Some(from));
            self.count = 1;
        }
        Ok(self.count)
    }

    /// The `i`th datagram of the last [`RxBatch::recv`] and its source; `None` past the end
    /// or for a datagram that was truncated or had no usable source address.
    pub fn get(&self, i: usize) -> Option<(&[u8], SocketAddr)> {
        if i >= self.count {
            return None;
        }
        let (len, from) = self.lens[i];
        let from = from?;
        let start = i * MAX_DATAGRAM;
        Some((&self.bufs[start..start + len], from))
    }

    /// Number of datagrams read by the last [`RxBatch::recv`].
    pub fn count(&self) -> usize {
        self.count
    }
}

#[cfg(target_os = "linux")]
mod linux {
    //! The system calls. Every pointer handed to the kernel points into a buffer owned by the
    //! caller or by the scratch struct and stays valid for the duration of the call; the
    //! scratch arrays are rebuilt before every call, so no pointer outlives its buffer.
    use std::io;
    use std::mem::{size_of, zeroed};
    use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
    use std::os::fd::RawFd;

    use super::MAX_DATAGRAM;

    /// `CMSG_SPACE(sizeof(u16))` rounded up generously: room for one `UDP_SEGMENT` cmsg.
    const CMSG_BUF: usize = 32;

    /// Control-message space with the alignment `cmsghdr` needs.
    #[derive(Clone, Copy)]
    #[repr(C, align(8))]
    struct CmsgBuf([u8; CMSG_BUF]);

    pub(super) struct SendScratch {
        hdrs: Vec<libc::mmsghdr>,
        iovs: Vec<libc::iovec>,
        addrs: Vec<libc::sockaddr_storage>,
        cmsgs: Vec<CmsgBuf>,
        cap: usize,
    }

    // SAFETY: the raw pointers inside `hdrs`/`iovs` are only meaningful during one
    // `sendmmsg` call, which happens on the thread that owns the batch; they are rebuilt before
    // every call. Moving the scratch between threads between calls is harmless.
    unsafe impl Send for SendScratch {}

    impl SendScratch {
        pub(super) fn new(cap: usize) -> Self {
            let cap = cap.max(1);
            SendScratch {
                // SAFETY: all-zero is a valid value of these plain C structs.
                hdrs: Vec::with_capacity(cap),
                iovs: Vec::with_capacity(cap),
                addrs: vec![unsafe { zeroed() }; cap],
                cmsgs: vec![CmsgBuf([0; CMSG_BUF]); cap],
                cap,
            }
        }

        pub(super) fn capacity(&self) -> usize {
            self.cap
        }

        pub(super) fn clear(&mut self) {
            self.hdrs.clear();
            self.iovs.clear();
        }

        /// Add one message: `data` to `dest`, cut into `seg`-byte datagrams if `seg` is set.
        pub(super) fn add(&mut self, data: &[u8], dest: SocketAddr, v6: bool, seg: Option<usize>) {
            let k = self.hdrs.len();
            let addr_len = write_sockaddr(&mut self.addrs[k], dest, v6);
            self.iovs.push(libc::iovec {
                iov_base: data.as_ptr() as *mut libc::c_void,
                iov_len: data.len(),
            });
            // SAFETY: all-zero is a valid `msghdr`.
            let mut h: libc::msghdr = unsafe { zeroed() };
            h.msg_name = &mut self.addrs[k] as *mut libc::sockaddr_storage as *mut libc::c_void;
            h.msg_namelen = addr_len;
            h.msg_iovlen = 1;
            if let Some(seg) = seg {
                let buf = &mut self.cmsgs[k];
                h.msg_control = buf.0.as_mut_ptr() as *mut libc::c_void;
                // SAFETY: CMSG_SPACE is a pure size computation.
                h.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as _;
                // SAFETY: msg_control points to CMSG_BUF (≥ CMSG_SPACE(2)) aligned bytes, so
                // CMSG_FIRSTHDR returns a valid header pointer inside it and CMSG_DATA has room
                // for the u16.
                unsafe {
                    let c = libc::CMSG_FIRSTHDR(&h);
                    (*c).cmsg_level = libc::SOL_UDP;
                    (*c).cmsg_type = libc::UDP_SEGMENT;
                    (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as _;
                    std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut u16, seg as u16);
                }
            }
            self.hdrs.push(libc::mmsghdr {
                msg_hdr: h,
                msg_len: 0,
            });
        }

        /// One `sendmmsg` over the messages added since `clear`. `Ok(n)`: the first `n` went.
        pub(super) fn sendmmsg(&mut self, fd: RawFd) -> io::Result<usize> {
            // The iovec vector is complete now: point each header at its iovec.
            for (h, iov) in self.hdrs.iter_mut().zip(self.iovs.iter_mut()) {
                h.msg_hdr.msg_iov = iov as *mut libc::iovec;
            }
            loop {
                // SAFETY: `hdrs` holds `len` initialised headers whose name, iovec, buffer and
                // control pointers are valid for this call (see the module comment).
                let r = unsafe {
                    libc::sendmmsg(
                        fd,
                        self.hdrs.as_mut_ptr(),
                        self.hdrs.len() as libc::c_uint,
                        libc::MSG_DONTWAIT,
                    )
                };
                if r >= 0 {
                    return Ok(r as usize);
                }
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }

    /// Writes `dest` into `out` as the socket's family expects (v4 destinations are mapped to
    /// `::ffff:a.b.c.d` on an IPv6 socket). Returns the address length.
    fn write_sockaddr(out: &mut libc::sockaddr_storage, dest: SocketAddr, v6: bool) -> u32 {
        let dest = match (dest, v6) {
            (SocketAddr::V4(a), true) => {
                SocketAddr::V6(SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0))
            }
            (d, _) => d,
        };
        match dest {
            SocketAddr::V4(a) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(a.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
                unsafe {
                    std::ptr::write(out as *mut _ as *mut libc::sockaddr_in, sin);
                }
                size_of::<libc::sockaddr_in>() as u32
            }
            SocketAddr::V6(a) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: a.flowinfo(),
                    sin6_addr: libc::in6_addr {
                        s6_addr: a.ip().octets(),
                    },
                    sin6_scope_id: a.scope_id(),
                };
                // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
                unsafe {
                    std::ptr::write(out as *mut _ as *mut libc::sockaddr_in6, sin6);
                }
                size_of::<libc::sockaddr_in6>() as u32
            }
        }
    }

    /// Reads a `sockaddr_storage` the kernel filled in.
    fn read_sockaddr(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
        match s.ss_family as i32 {
            libc::AF_INET => {
                // SAFETY: the family says the storage holds a sockaddr_in.
                let sin = unsafe { &*(s as *const _ as *const libc::sockaddr_in) };
                let ip = std::net::Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
                Some(SocketAddr::V4(SocketAddrV4::new(
                    ip,
                    u16::from_be(sin.sin_port),
                )))
            }
            libc::AF_INET6 => {
                // SAFETY: the family says the storage holds a sockaddr_in6.
                let sin6 = unsafe { &*(s as *const _ as *const libc::sockaddr_in6) };
                let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                let port = u16::from_be(sin6.sin6_port);
                // A v4 peer on a dual-stack socket: report it as v4, as std does not but
                // str0m's candidates are v4.
                Some(match ip.to_ipv4_mapped() {
                    Some(v4) => SocketAddr::new(IpAddr::V4(v4), port),
                    None => SocketAddr::V6(SocketAddrV6::new(
                        ip,
                        port,
                        sin6.sin6_flowinfo,
                        sin6.sin6_scope_id,
                    )),
                })
            }
            _ => None,
        }
    }

    pub(super) struct RecvScratch {
        hdrs: Vec<libc::mmsghdr>,
        iovs: Vec<libc::iovec>,
        addrs: Vec<libc::sockaddr_storage>,
    }

    // SAFETY: as for SendScratch: pointers are rebuilt before every call.
    unsafe impl Send for RecvScratch {}

    impl RecvScratch {
        pub(super) fn new(cap: usize) -> Self {
            RecvScratch {
                // SAFETY: all-zero is a valid value of these plain C structs.
                hdrs: vec![unsafe { zeroed() }; cap],
                iovs: vec![
                    libc::iovec {
                        iov_base: std::ptr::null_mut(),
                        iov_len: 0
                    };
                    cap
                ],
                addrs: vec![unsafe { zeroed() }; cap],
            }
        }

        /// One `recvmmsg` into `bufs` (`cap` slots of MAX_DATAGRAM bytes).
        pub(super) fn recvmmsg(&mut self, fd: RawFd, bufs: &mut [u8]) -> io::Result<usize> {
            let cap = self.hdrs.len().min(bufs.len() / MAX_DATAGRAM);
            for (k, chunk) in bufs.chunks_exact_mut(MAX_DATAGRAM).take(cap).enumerate() {
                self.iovs[k] = libc::iovec {
                    iov_base: chunk.as_mut_ptr() as *mut libc::c_void,
                    iov_len: MAX_DATAGRAM,
                };
                // SAFETY: all-zero is a valid `msghdr`.
                let mut h: libc::msghdr = unsafe { zeroed() };
                h.msg_name = &mut self.addrs[k] as *mut _ as *mut libc::c_void;
                h.msg_namelen = size_of::<libc::sockaddr_storage>() as u32;
                h.msg_iov = &mut self.iovs[k] as *mut libc::iovec;
                h.msg_iovlen = 1;
                self.hdrs[k] = libc::mmsghdr {
                    msg_hdr: h,
                    msg_len: 0,
                };
            }
            loop {
                // SAFETY: `cap` headers point at live buffers and addresses owned by `self`
                // and `bufs` for the duration of the call.
                let r = unsafe {
                    libc::recvmmsg(
                        fd,
                        self.hdrs.as_mut_ptr(),
                        cap as libc::c_uint,
                        libc::MSG_DONTWAIT,
                        std::ptr::null_mut(),
                    )
                };
                if r >= 0 {
                    return Ok(r as usize);
                }
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }

        /// Length and source of message `i` of the last call (`None` source: truncated or
        /// unknown family, to be skipped).
        pub(super) fn result(&self, i: usize) -> (usize, Option<SocketAddr>) {
            let h = &self.hdrs[i];
            let len = (h.msg_len as usize).min(MAX_DATAGRAM);
            if h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                return (0, None);
            }
            (len, read_sockaddr(&self.addrs[i]))
        }
    }

    /// `getsockopt(SOL_UDP, UDP_SEGMENT)` succeeds only where the kernel knows UDP GSO.
    pub(super) fn gso_supported(fd: RawFd) -> bool {
        let mut v: libc::c_int = 0;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `v` and `len` are valid for writes of the sizes given.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_UDP,
                libc::UDP_SEGMENT,
                &mut v as *mut libc::c_int as *mut libc::c_void,
                &mut len,
            )
        };
        r == 0
    }
}

#[cfg(test)]
mod tests {
    //! Real sockets on loopback: what a batch sends arrives intact, in order, and GSO runs
    //! come out as the individual datagrams they were made of.
    use super::*;
    use std::time::Duration;

    async fn pair() -> (UdpSocket, UdpSocket) {
        let a = UdpSocket::bind("127.0.0.1:0").await.expect("bind a");
        let b = UdpSocket::bind("127.0.0.1:0").await.expect("bind b");
        (a, b)
    }

    /// Receives `n` datagrams on `s` through an RxBatch (waiting up to 2 s in total).
    async fn recv_n(s: &UdpSocket, n: usize) -> Vec<(Vec<u8>, SocketAddr)> {
        let mut rx = RxBatch::new(16);
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while got.len() < n {
            let ready = tokio::time::timeout_at(deadline, s.readable()).await;
            assert!(
                ready.is_ok(),
                "timed out after {} of {n} datagrams",
                got.len()
            );
            match s.try_io(tokio::io::Interest::READABLE, || rx.recv(s)) {
                Ok(k) => {
                    for i in 0..k {
                        if let Some((d, from)) = rx.get(i) {
                            got.push((d.to_vec(), from));
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("recv: {e}"),
            }
        }
        got
    }

    #[tokio::test]
    async fn batch_arrives_in_order_with_and_without_gso() {
        for gso_wanted in [false, true] {
            let (a, b) = pair().await;
            let gso = gso_wanted && gso_supported(&a);
            let to = b.local_addr().expect("addr");
            let mut tx = TxBatch::new(64, gso);
            // Ten equal datagrams (a GSO run), then a short one (ends the run), then two
            // different sizes.
            let mut sent = Vec::new();
            for i in 0..10u8 {
                sent.push(vec![i; 1000]);
            }
            sent.push(vec![0xaa; 300]);
            sent.push(vec![0xbb; 1200]);
            sent.push(vec![0xcc; 50]);
            for d in &sent {
                assert!(tx.push(to, d));
            }
            let st = tx.flush(&a);
            assert_eq!(st.sent, sent.len(), "gso={gso}");
            assert_eq!(st.dropped, 0);
            assert!(tx.is_empty());
            if gso {
                // The ten equal ones and the short one travel as one message.
                assert!(st.gso_messages >= 1, "{st:?}");
                assert_eq!(st.syscalls, 1);
            }
            let got = recv_n(&b, sent.len()).await;
            let from = a.local_addr().expect("addr");
            for ((d, src), want) in got.iter().zip(&sent) {
                assert_eq!(d, want);
                assert_eq!(*src, from);
            }
        }
    }

    #[tokio::test]
    async fn runs_split_by_destination_and_refuse_oversize() {
        let (a, b) = pair().await;
        let c = UdpSocket::bind("127.0.0.1:0").await.expect("bind c");
        let (tb, tc) = (b.local_addr().expect("b"), c.local_addr().expect("c"));
        let mut tx = TxBatch::new(8, gso_supported(&a));
        assert!(!tx.push(tb, &[0u8; MAX_DATAGRAM + 1]));
        assert!(!tx.push(tb, &[]));
        for i in 0..8u8 {
            let to = if i % 2 == 0 { tb } else { tc };
            assert!(tx.push(to, &[i; 100]));
        }
        assert!(tx.is_full());
        assert!(!tx.push(tb, &[9; 100]));
        let st = tx.flush(&a);
        assert_eq!(st.sent, 8);
        assert_eq!(
            st.gso_messages, 0,
            "alternating destinations never form a run"
        );
        let gb = recv_n(&b, 4).await;
        let gc = recv_n(&c, 4).await;
        assert_eq!(
            gb.iter().map(|(d, _)| d[0]).collect::<Vec<_>>(),
            vec![0, 2, 4, 6]
        );
        assert_eq!(
            gc.iter().map(|(d, _)| d[0]).collect::<Vec<_>>(),
            vec![1, 3, 5, 7]
        );
    }

    #[tokio::test]
    async fn unreachable_destination_is_counted_not_fatal() {
        let (a, b) = pair().await;
        // A port nobody listens on: loopback answers with ICMP port unreachable, which the
        // kernel reports on a later send; every datagram to b must still arrive.
        let dead = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let dead_addr = dead.local_addr().expect("addr");
        drop(dead);
        let to = b.local_addr().expect("addr");
        let mut tx = TxBatch::new(16, false);
        let mut delivered = 0;
        for round in 0..3u8 {
            tx.push(dead_addr, &[round; 10]);
            tx.push(to, &[round; 20]);
            let st = tx.flush(&a);
            delivered += st.sent;
            assert_eq!(st.sent + st.dropped, 2);
        }
        assert!(delivered >= 3);
        let got = recv_n(&b, 3).await;
        assert_eq!(got.len(), 3);
    }
}
