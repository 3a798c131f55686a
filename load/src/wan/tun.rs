//! A TUN device: the kernel hands us every IP packet routed into it, and takes back every
//! packet we write, as if it had just arrived on that interface.
//!
//! Opened without packet information (`IFF_NO_PI`), so a read returns exactly one IP packet and
//! a write takes exactly one. The device itself is normally created beforehand
//! (`ip tuntap add dev wan0 mode tun`, persistent): attaching to it here means that if this
//! process dies the device stays, without carrier, and drops what is routed to it instead of
//! letting packets bypass the emulator.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::WanError;

/// An attached TUN device (non-blocking).
pub struct Tun {
    fd: OwnedFd,
}

impl Tun {
    /// Attaches to (or creates) the TUN device `name` in the current network namespace.
    pub fn attach(name: &str) -> Result<Tun, WanError> {
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
            return Err(WanError::Tun(format!("bad interface name {name:?}")));
        }
        // SAFETY: a constant NUL-terminated path; `open` returns a new descriptor or -1.
        let raw = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(WanError::Tun(format!(
                "open /dev/net/tun: {}",
                io::Error::last_os_error()
            )));
        }
        // SAFETY: `raw` is a descriptor we just opened and own from here on.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: `ifreq` is plain old data; all zeroes is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, &src) in ifr.ifr_name.iter_mut().zip(bytes) {
            *dst = src as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one `ifreq`, which `ifr` is.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut ifr) } < 0 {
            return Err(WanError::Tun(format!(
                "TUNSETIFF {name}: {}",
                io::Error::last_os_error()
            )));
        }
        Ok(Tun { fd })
    }

    /// Reads one packet into `buf`: its length, or `None` if none is waiting.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
            _ => Err(err),
        }
    }

    /// Writes one packet back into the kernel.
    pub fn send(&self, packet: &[u8]) -> io::Result<()> {
        // SAFETY: `packet` is valid for reads of `packet.len()` bytes.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), packet.as_ptr().cast(), packet.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl AsRawFd for Tun {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
