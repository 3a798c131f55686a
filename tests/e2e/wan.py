"""A small emulated WAN: N "site" network namespaces joined through one router namespace whose
userspace emulator (`arbor-wan`) delays and drops packets per pair of sites.

Why userspace: this kernel has no `netem` qdisc (`tc qdisc add ... netem` says "Specified qdisc
kind is unknown"). `tbf` (rate) and nftables (random loss) exist and `netns.ChildNet` uses them,
but neither can *delay* a packet, and neither can tell site pairs apart cheaply. A TUN device can:
the kernel hands every routed packet to a process and takes back whatever it writes.

    site a (10.210.1.2)         router namespace                          site b (10.210.2.2)
      s1 ───── veth ───── r1 10.210.1.1                       10.210.2.1 r2 ───── veth ───── s2
                           │  ip rule: iif r1 → table 100 (default dev wan0)  │
                           └──► wan0 (TUN) ⇄ arbor-wan ⇄ wan0 ──► main table ─┘
                                       (hold `delay`, drop with `loss`)

1. Each site namespace has one veth to the router: the site end holds `10.210.<i>.2/24` with a
   default route via the router end `10.210.<i>.1` (sites are numbered from 1 in list order).
2. In the router, one policy rule per site veth (`ip rule add iif r<i> lookup 100`) sends every
   packet *forwarded* from a site into the TUN `wan0`. Packets to the router's own addresses
   are delivered by the local table first and never see the emulator.
3. `arbor-wan` reads each IP packet from `wan0`, finds the (source site, destination site) pair
   from the addresses, drops it with the pair's probability (a seeded random stream per pair:
   same seed, same packets, same losses) or holds it for the pair's one-way delay, then writes
   it back into `wan0`.
4. The kernel sees the packet arrive *on* `wan0`. No rule matches `iif wan0`, so the main table
   routes it out of the destination site's veth. No loop. (`rp_filter` is off in the router:
   the source address belongs behind another interface, which strict reverse-path filtering
   would reject.) Each packet is forwarded twice, so its TTL drops by 2.

The emulator keeps each pair first-in first-out (equal delays never reorder; lowering a delay
lets the queue drain instead of overtaking), bounds what it holds, wakes with `ppoll` at the due
time of the next packet (no busy loop) and stops by itself: at end of its control pipe, when the
process that started it dies, or after `max_seconds`. Its scheduler is a sans-IO struct with
unit tests (`load/src/wan/sched.rs`); `tests/e2e/test_wan.py` measures the whole path.

Precision (measured by tests/e2e/test_wan.py on a shared 2-core machine busy compiling): ping
across a 25 ms link reads 50.3 ms (0.2 ms without delay); at 10 000 packets/s through the
emulator, packets leave on average 16 us and at worst 0.3 ms after their due time. That needs
the `SCHED_FIFO` priority the fixture asks for (`--rt-priority 10`; it never busy-waits, so it
costs nothing while idle); with `ARBOR_E2E_WAN_RT=0` it runs at normal priority: 0.3 ms mean,
5 ms worst on the same busy machine. Throughput: 40 000 packets in 2 s one way plus their echoes
(35 000 packets/s through the emulator) all forwarded, none overflowing; at that rate the Python
echo server, not the emulator, is what drops.

`local="name"` adds the calling process's own namespace (the suite's) as one more site, at
`10.210.0.2` with a route to `10.210.0.0/16` through the router: in-process clients (the LiveKit
Python SDK of the other tests) then reach servers in the sites through the emulator, with a
link of their own. It adds a veth `wanl` to the caller's namespace, so it refuses to run outside
`tests/e2e/run`, and only one such Wan may exist at a time.

Usage::

    with Wan(["eu", "us", "ap"], seed=3) as wan:
        wan.set_link("eu", "us", delay_ms=40, loss=0.01)    # both directions, 80 ms RTT
        srv = wan.popen("us", ["python3", "-m", "http.server", "8000"])
        subprocess.run(wan.argv("eu", "curl", f"http://{wan.ip('us')}:8000/"))
        print(wan.stats()[("eu", "us")])                   # {'forwarded': .., 'dropped': .., ...}

Like `netns.ChildNet`, the namespaces are held by `unshare --net sleep` processes (no names under
/run/netns, nothing on the host), commands enter them with `nsenter`, and every address is inside
namespaces created here. The binary is `$ARBOR_E2E_WAN_BIN`, else `target/debug/arbor-wan`
(`cargo build -p arbor-load --bin arbor-wan`; scripts/test builds it and sets the variable).
"""

from __future__ import annotations

import json
import math
import os
import re
import select
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

from netns import _Holder, _run

ROOT = Path(__file__).resolve().parents[2]

# Routing table in the router namespace whose only route leads into the emulator.
WAN_TABLE = 100
# Priority of the per-site policy rules (after `local` at 0, before `main` at 32766).
RULE_PREF = 1000
TUN = "wan0"
# The caller's end of the `local` site's veth.
LOCAL_IF = "wanl"
# Packets the kernel may queue towards the emulator before dropping (the TUN's txqueuelen).
TUN_QUEUE = 4096
# Seconds to wait for the emulator to start or answer a command.
REPLY_TIMEOUT = 10.0
MAX_SITES = 250
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")


def wan_binary() -> Path:
    """Path of `arbor-wan`: `$ARBOR_E2E_WAN_BIN` or the workspace's debug build."""
    return Path(os.environ.get("ARBOR_E2E_WAN_BIN") or ROOT / "target" / "debug" / "arbor-wan")


class Wan:
    """Site namespaces joined through an emulating router (see the module doc). A context
    manager: `with Wan([...]) as wan:` starts it and always cleans up."""

    def __init__(self, sites: list[str], *, seed: int = 1, max_seconds: int = 600,
                 local: Optional[str] = None) -> None:
        """`sites` get namespaces of their own. `local`, if given, names one more site: the
        namespace of the calling process itself (the e2e suite's namespace), joined to the router
        by a veth `wanl` with `10.210.0.2/24` and a route to `10.210.0.0/16`, so that in-process
        clients reach the sites through the emulator like any other site. Only inside the suite's
        private namespace (`tests/e2e/run`), and one such Wan at a time."""
        if not 1 <= len(sites) <= MAX_SITES:
            raise ValueError(f"need 1..{MAX_SITES} sites, got {len(sites)}")
        for s in sites:
            if not isinstance(s, str) or not _NAME.match(s):
                raise ValueError(f"bad site name {s!r}: 1..32 characters of [A-Za-z0-9_.-]")
        if len(set(sites)) != len(sites):
            raise ValueError(f"site names repeat: {sites}")
        if max_seconds <= 0:
            raise ValueError("max_seconds must be positive")
        if local is not None:
            if not _NAME.match(local) or local in sites:
                raise ValueError(f"bad local site name {local!r}: [A-Za-z0-9_.-], not one of the sites")
            if os.environ.get("ARBOR_E2E_IN_NETNS") != "1":
                raise RuntimeError("Wan(local=...) changes the calling namespace: only inside tests/e2e/run")
        self.sites = list(sites)
        self.local = local
        self.seed = int(seed)
        self.max_seconds = int(max_seconds)
        self._index = {name: i + 1 for i, name in enumerate(self.sites)}
        if local is not None:
            self._index[local] = 0
        self.router: Optional[_Holder] = None
        self._holders: dict[str, _Holder] = {}
        self.emulator: Optional[subprocess.Popen] = None
        self._stderr: Optional[str] = None  # path of the emulator's stderr log
        self._buf = b""
        self._lock = threading.Lock()
        self._local_attached = False

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> "Wan":
        binary = wan_binary()
        if not binary.is_file():
            raise RuntimeError(
                f"arbor-wan not found at {binary}: run `cargo build -p arbor-load --bin arbor-wan` "
                "or set ARBOR_E2E_WAN_BIN")
        try:
            self.router = r = _Holder(self.max_seconds)
            for name in self.sites:
                self._holders[name] = _Holder(self.max_seconds)
            # Forwarding on, reverse-path filtering off (see step 4 of the module doc), no IPv6
            # (nothing to emulate there, and it keeps router solicitations out of the TUN), no
            # redirects. `default` first, so interfaces created afterwards inherit it.
            _run(*r.argv("sysctl", "-q", "-w", "net.ipv4.ip_forward=1",
                         "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0",
                         "net.ipv4.conf.all.send_redirects=0", "net.ipv4.conf.default.send_redirects=0",
                         "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"))
            _run(*r.argv("ip", "link", "set", "lo", "up"))
            # Persistent, so that if the emulator dies the device stays (without carrier) and drops
            # what is routed to it, rather than vanishing and letting packets bypass the emulator.
            _run(*r.argv("ip", "tuntap", "add", "dev", TUN, "mode", "tun"))
            _run(*r.argv("ip", "link", "set", TUN, "txqueuelen", str(TUN_QUEUE), "up"))
            _run(*r.argv("ip", "route", "add", "default", "dev", TUN, "table", str(WAN_TABLE)))
            if self.local is not None:
                self._attach_local()
            for name in self.sites:
                i, site = self._index[name], self._holders[name]
                _run(*r.argv("ip", "link", "add", f"r{i}", "type", "veth", "peer", "name", f"s{i}"))
                _run(*r.argv("ip", "link", "set", f"s{i}", "netns", str(site.proc.pid)))
                _run(*r.argv("ip", "addr", "add", f"10.210.{i}.1/24", "dev", f"r{i}"))
                _run(*r.argv("ip", "link", "set", f"r{i}", "up"))
                _run(*r.argv("ip", "rule", "add", "iif", f"r{i}", "lookup", str(WAN_TABLE),
                             "pref", str(RULE_PREF)))
                _run(*site.argv("ip", "link", "set", "lo", "up"))
                _run(*site.argv("ip", "addr", "add", f"10.210.{i}.2/24", "dev", f"s{i}"))
                _run(*site.argv("ip", "link", "set", f"s{i}", "up"))
                _run(*site.argv("ip", "route", "add", "default", "via", f"10.210.{i}.1"))
            argv = [str(binary), "--tun", TUN, "--seed", str(self.seed),
                    "--max-seconds", str(self.max_seconds)]
            if os.environ.get("ARBOR_E2E_WAN_RT", "1") != "0":
                argv += ["--rt-priority", "10"]  # punctual wake-ups on a busy machine
            for name, i in self._index.items():
                argv += ["--site", f"{name}=10.210.{i}.0/24"]
            fd, self._stderr = tempfile.mkstemp(prefix="arbor-wan-", suffix=".log")
            os.close(fd)
            with open(self._stderr, "wb") as log:
                self.emulator = subprocess.Popen(r.argv(*argv), stdin=subprocess.PIPE,
                                                 stdout=subprocess.PIPE, stderr=log)
            first = self._readline(REPLY_TIMEOUT)
            if first != "ready":
                raise RuntimeError(f"arbor-wan did not start: {first!r}{self._stderr_tail()}")
        except Exception:
            self.close()
            raise
        return self

    def _attach_local(self) -> None:
        """The veth between the caller's namespace (`wanl`, 10.210.0.2) and the router (`r0`,
        10.210.0.1), with its policy rule, like a site's."""
        r = self.router
        assert r is not None
        _run(*r.argv("ip", "link", "add", "r0", "type", "veth", "peer", "name", LOCAL_IF))
        _run(*r.argv("ip", "link", "set", LOCAL_IF, "netns", str(os.getpid())))
        self._local_attached = True
        _run(*r.argv("ip", "addr", "add", "10.210.0.1/24", "dev", "r0"))
        _run(*r.argv("ip", "link", "set", "r0", "up"))
        _run(*r.argv("ip", "rule", "add", "iif", "r0", "lookup", str(WAN_TABLE), "pref", str(RULE_PREF)))
        _run("ip", "addr", "add", "10.210.0.2/24", "dev", LOCAL_IF)
        _run("ip", "link", "set", LOCAL_IF, "up")
        _run("ip", "route", "add", "10.210.0.0/16", "via", "10.210.0.1")

    def close(self) -> None:
        """Stops the emulator and removes every namespace (idempotent)."""
        if self._local_attached:
            # Deleting one end of a veth deletes both; the route goes with the device.
            subprocess.run(["ip", "link", "del", LOCAL_IF], capture_output=True, timeout=20)
            self._local_attached = False
        if self.emulator is not None:
            try:
                if self.emulator.stdin:
                    self.emulator.stdin.close()  # end of input: it exits
                self.emulator.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.emulator.kill()
                self.emulator.wait(timeout=5)
            if self.emulator.stdout:
                self.emulator.stdout.close()
        # Killing a holder ends its namespace; the veths and the TUN go with it.
        for h in [*self._holders.values(), self.router]:
            if h is not None:
                h.close()
        if self._stderr is not None:
            try:
                os.unlink(self._stderr)
            except OSError:
                pass
            self._stderr = None

    def __enter__(self) -> "Wan":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- sites --------------------------------------------------------------------------------

    def _check(self, site: str) -> None:
        if site not in self._index:
            raise KeyError(f"no site {site!r} (sites: {self.sites}, local: {self.local})")

    def ip(self, site: str) -> str:
        """The site's address, `10.210.<i>.2` (i = 1 + its position in `sites`; 0 for `local`)."""
        self._check(site)
        return f"10.210.{self._index[site]}.2"

    def argv(self, site: str, *argv: str) -> list[str]:
        """`argv` wrapped to run inside the site's namespace (unchanged for the `local` site)."""
        self._check(site)
        if site == self.local:
            return list(argv)
        holder = self._holders.get(site)
        if holder is None:
            raise RuntimeError("Wan not started")
        return holder.argv(*argv)

    def popen(self, site: str, argv: list[str], **kw) -> subprocess.Popen:
        """`subprocess.Popen` of `argv` inside the site's namespace."""
        return subprocess.Popen(self.argv(site, *argv), **kw)

    # -- emulation ----------------------------------------------------------------------------

    def set_link(self, a: str, b: str, *, delay_ms: float = 0.0, loss: float = 0.0) -> None:
        """Sets the path between sites `a` and `b`, the same in both directions: each packet is
        held `delay_ms` (so the round trip gains 2 x delay_ms) and dropped with probability
        `loss` (0..1). Applies to packets sent from now on; `set_link(a, b)` restores a
        perfect link."""
        for s in (a, b):
            self._check(s)
        if a == b:
            raise ValueError("a site has no link to itself")
        if not (math.isfinite(delay_ms) and 0 <= delay_ms <= 60_000):
            raise ValueError(f"delay_ms {delay_ms} outside 0..60000")
        if not (math.isfinite(loss) and 0 <= loss <= 1):
            raise ValueError(f"loss {loss} outside 0..1")
        for src, dst in ((a, b), (b, a)):
            answer = self._command(f"link {src} {dst} {float(delay_ms)!r} {float(loss)!r}")
            if answer != "ok":
                raise RuntimeError(f"arbor-wan refused link {src}->{dst}: {answer}")

    def stats(self) -> dict:
        """Counters per directed pair: `{(src, dst): {"forwarded", "dropped", "overflow",
        "queued"}}` — `dropped` by the link's loss, `overflow` by the emulator's bounds."""
        raw = self.raw_stats()
        return {(p["src"], p["dst"]): {k: p[k] for k in ("forwarded", "dropped", "overflow", "queued")}
                for p in raw["pairs"]}

    def raw_stats(self) -> dict:
        """The emulator's whole `stats` reply: pairs with their current link settings, plus
        `unmatched`, `not_ipv4`, `queued_packets`, `write_errors` and `lateness` (how late held
        packets left: count, total_ns, max_ns, buckets < 100/250/500/1000/2000/5000 µs and more)."""
        answer = self._command("stats")
        try:
            return json.loads(answer)
        except ValueError:
            raise RuntimeError(f"arbor-wan stats: {answer}") from None

    # -- control pipe -------------------------------------------------------------------------

    def _command(self, line: str) -> str:
        with self._lock:
            if self.emulator is None or self.emulator.stdin is None:
                raise RuntimeError("Wan not started")
            try:
                self.emulator.stdin.write(line.encode() + b"\n")
                self.emulator.stdin.flush()
            except OSError as e:
                raise RuntimeError(f"arbor-wan is gone ({e}){self._stderr_tail()}") from None
            return self._readline(REPLY_TIMEOUT)

    def _readline(self, timeout: float) -> str:
        """One line from the emulator's stdout, without blocking past `timeout`."""
        assert self.emulator is not None and self.emulator.stdout is not None
        fd = self.emulator.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"arbor-wan did not answer within {timeout} s{self._stderr_tail()}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise RuntimeError(f"arbor-wan exited ({self.emulator.poll()}){self._stderr_tail()}")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode(errors="replace")

    def _stderr_tail(self) -> str:
        if self._stderr is None:
            return ""
        try:
            text = Path(self._stderr).read_text(errors="replace").strip()
        except OSError:
            return ""
        return f"; its stderr: {text[-2000:]}" if text else ""
