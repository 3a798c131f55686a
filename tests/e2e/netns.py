"""A child network namespace behind a router namespace, so one client's network can be impaired
alone, the way a real bottleneck impairs it.

The e2e suite runs in a private namespace where the server has 10.200.0.1 and every client shares
the veth pair v0/v1. To limit *one* subscriber (rate, loss) it gets a path of its own:

    test namespace              router namespace                child namespace
    arbor 10.200.0.1   rNs ─── rNr 10.202.N.2                   10.201.N.2, default via .1
          10.202.N.1               10.201.N.1  qNh ──────── qNc  python client (nsenter)

Every impairment lives in the router: a rate limit is a `tbf` qdisc on the router's egress in
each direction, random loss an nftables rule in the router's ingress hooks (this kernel has no
`netem`). Why a router rather than shaping the test namespace's own veth: packets queued in a qdisc
of the sender's own namespace are still charged to the sending socket, and arbor sends to every
peer from one UDP socket, so a local queue would block the socket for every peer, which no real
downstream bottleneck does. A packet that enters another namespace is released by the socket
(`ip_rcv` orphans it) before it waits in the router's queue.

The server must listen for signalling on 0.0.0.0 (`start_arbor(..., bind="0.0.0.0")`); the child
reaches ws://10.200.0.1 through the router. The namespaces are held by `unshare --net sleep`
processes started here (no names under /run/netns, nothing left on the host); commands enter them
with `nsenter`. Every address is inside namespaces this test created; nothing targets anything
outside.
"""

from __future__ import annotations

import os
import subprocess
import time
from typing import Optional


# Name of the nftables table (in each namespace's own ruleset) that drops packets.
LOSS_TABLE = "arbor_loss"


def _run(*argv: str) -> None:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    if r.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed ({r.returncode}): {r.stderr.strip()}")


class _Holder:
    """A process holding a fresh network namespace (`unshare --net sleep`)."""

    def __init__(self, max_seconds: int) -> None:
        own = os.readlink("/proc/self/ns/net")
        self.proc = subprocess.Popen(["unshare", "--net", "sleep", str(max_seconds)])
        deadline = time.monotonic() + 10
        while True:
            try:
                if os.readlink(f"/proc/{self.proc.pid}/ns/net") != own:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("unshare --net did not create a namespace")
            time.sleep(0.02)

    def argv(self, *argv: str) -> list[str]:
        return ["nsenter", "-t", str(self.proc.pid), "-n", "--", *argv]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


class ChildNet:
    """Child namespace `10.201.<index>.2`, behind a router namespace (see the module doc)."""

    def __init__(self, index: int, *, max_seconds: int = 600) -> None:
        if not 1 <= index <= 250:
            raise ValueError("index must be 1..250")
        self.index = index
        self.max_seconds = max_seconds
        self.test_if, self.router_up_if = f"r{index}s", f"r{index}r"  # test ns <-> router
        self.router_down_if, self.child_if = f"q{index}h", f"q{index}c"  # router <-> child
        self.test_ip, self.router_up_ip = f"10.202.{index}.1", f"10.202.{index}.2"
        self.router_down_ip, self.child_ip = f"10.201.{index}.1", f"10.201.{index}.2"
        self.router: Optional[_Holder] = None
        self.child_ns: Optional[_Holder] = None

    def start(self) -> "ChildNet":
        try:
            self.router = _Holder(self.max_seconds)
            self.child_ns = _Holder(self.max_seconds)
            r, c = self.router, self.child_ns
            _run("ip", "link", "add", self.test_if, "type", "veth", "peer", "name", self.router_up_if)
            _run("ip", "link", "set", self.router_up_if, "netns", str(r.proc.pid))
            _run("ip", "addr", "add", f"{self.test_ip}/24", "dev", self.test_if)
            _run("ip", "link", "set", self.test_if, "up")
            _run("ip", "route", "add", f"10.201.{self.index}.0/24", "via", self.router_up_ip)
            _run(*r.argv("ip", "link", "set", "lo", "up"))
            _run(*r.argv("ip", "addr", "add", f"{self.router_up_ip}/24", "dev", self.router_up_if))
            _run(*r.argv("ip", "link", "set", self.router_up_if, "up"))
            _run(*r.argv("ip", "link", "add", self.router_down_if, "type", "veth", "peer", "name", self.child_if))
            _run(*r.argv("ip", "link", "set", self.child_if, "netns", str(c.proc.pid)))
            _run(*r.argv("ip", "addr", "add", f"{self.router_down_ip}/24", "dev", self.router_down_if))
            _run(*r.argv("ip", "link", "set", self.router_down_if, "up"))
            _run(*r.argv("ip", "route", "add", "default", "via", self.test_ip))
            # Forwarding is per namespace: this writes the router namespace's own setting.
            _run(*r.argv("sysctl", "-q", "-w", "net.ipv4.ip_forward=1"))
            _run(*c.argv("ip", "link", "set", "lo", "up"))
            _run(*c.argv("ip", "addr", "add", f"{self.child_ip}/24", "dev", self.child_if))
            _run(*c.argv("ip", "link", "set", self.child_if, "up"))
            _run(*c.argv("ip", "route", "add", "default", "via", self.router_down_ip))
        except Exception:
            self.close()
            raise
        return self

    def argv(self, *argv: str) -> list[str]:
        """`argv` wrapped to run inside the child namespace."""
        assert self.child_ns is not None, "ChildNet not started"
        return self.child_ns.argv(*argv)

    def limit_rate(self, rate: Optional[str], *, latency_ms: int = 300, burst: int = 3000) -> None:
        """Limits the path to `rate` (e.g. "300kbit") in both directions with a token bucket in
        the router (`tc qdisc ... tbf`: packets beyond the rate wait up to `latency_ms`, then
        drop, like a real bottleneck's queue); `None` removes the limit."""
        assert self.router is not None, "ChildNet not started"
        for dev in (self.router_down_if, self.router_up_if):
            if rate is None:
                subprocess.run(self.router.argv("tc", "qdisc", "del", "dev", dev, "root"),
                               capture_output=True, timeout=20)
            else:
                _run(*self.router.argv("tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
                                       "burst", str(burst), "latency", f"{latency_ms}ms"))

    def set_loss(self, percent: Optional[int]) -> None:
        """Drops `percent`% of the packets in each direction at random; `None` or 0 stops.

        An nftables rule in the router's ingress hook of both of its interfaces: a dropped packet
        vanishes on the wire as real loss does, and the sender never sees an error.
        """
        assert self.router is not None, "ChildNet not started"
        subprocess.run(self.router.argv("nft", "delete", "table", "netdev", LOSS_TABLE),
                       capture_output=True, timeout=20)
        if not percent:
            return
        rule = "drop" if percent >= 100 else f"numgen random mod 100 < {int(percent)} drop"
        chains = "".join(
            f"  chain loss_{dev} {{ type filter hook ingress device \"{dev}\" priority 0; {rule}; }}\n"
            for dev in (self.router_up_if, self.router_down_if)
        )
        ruleset = f"table netdev {LOSS_TABLE} {{\n{chains}}}\n"
        r = subprocess.run(self.router.argv("nft", "-f", "-"), input=ruleset, capture_output=True,
                           text=True, timeout=20)
        if r.returncode != 0:
            raise RuntimeError(f"nft failed ({r.returncode}): {r.stderr.strip()}\n{ruleset}")

    def clear(self) -> None:
        """Removes every impairment (nothing to do if the namespaces are gone)."""
        if self.router is None or not self.router.alive():
            return
        self.limit_rate(None)
        self.set_loss(None)

    def close(self) -> None:
        subprocess.run(["ip", "route", "del", f"10.201.{self.index}.0/24"], capture_output=True, timeout=20)
        subprocess.run(["ip", "link", "del", self.test_if], capture_output=True, timeout=20)
        for h in (self.child_ns, self.router):
            if h is not None:
                h.close()

    def __enter__(self) -> "ChildNet":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
