"""A child network namespace with its own link, so one client's network can be impaired alone.

The e2e suite runs in a private namespace where the server has 10.200.0.1 and every client shares
the veth pair v0/v1. To limit *one* subscriber (rate, loss) it needs a link of its own:

    test namespace                         child namespace (this module)
    ┌───────────────────────────┐  veth   ┌─────────────────────────────┐
    │ arbor  10.200.0.1 (v0)    │ qNh ─── qNc                           │
    │        10.201.N.1 (qNh)   │         │ 10.201.N.2, default via .1  │
    └───────────────────────────┘         │ python client (nsenter)     │
                                          └─────────────────────────────┘

The child reaches 10.200.0.1 through its default route (a local address of the test namespace, so
no forwarding is involved); the server must listen for signalling on 0.0.0.0 (`start_arbor(...,
bind="0.0.0.0")`). The namespace is held by an `unshare --net sleep` process we start ourselves (no
name under /run/netns, nothing left behind on the host), and commands enter it with `nsenter`.
`tc netem` on the two veth ends shapes the link: qNh's egress is server → client (downstream),
qNc's egress is client → server (upstream).

Every address here is inside namespaces this test created; nothing targets anything outside.
"""

from __future__ import annotations

import os
import subprocess
import time
from typing import Optional


def _run(*argv: str) -> None:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    if r.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed ({r.returncode}): {r.stderr.strip()}")


class ChildNet:
    """A child namespace `10.201.<index>.2` linked to the test namespace by veth `q<index>h/c`."""

    def __init__(self, index: int, *, max_seconds: int = 600) -> None:
        if not 1 <= index <= 250:
            raise ValueError("index must be 1..250")
        self.index = index
        self.host_if, self.child_if = f"q{index}h", f"q{index}c"
        self.host_ip, self.child_ip = f"10.201.{index}.1", f"10.201.{index}.2"
        self.max_seconds = max_seconds
        self.holder: Optional[subprocess.Popen] = None

    @property
    def pid(self) -> int:
        assert self.holder is not None, "ChildNet not started"
        return self.holder.pid

    def start(self) -> "ChildNet":
        own = os.readlink("/proc/self/ns/net")
        # The holder keeps the namespace alive; it exits by itself after max_seconds at the latest.
        self.holder = subprocess.Popen(["unshare", "--net", "sleep", str(self.max_seconds)])
        deadline = time.monotonic() + 10
        while True:
            try:
                if os.readlink(f"/proc/{self.pid}/ns/net") != own:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or self.holder.poll() is not None:
                self.close()
                raise RuntimeError("unshare --net did not create a child namespace")
            time.sleep(0.02)
        try:
            _run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.child_if)
            _run("ip", "link", "set", self.child_if, "netns", str(self.pid))
            _run("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.host_if)
            _run("ip", "link", "set", self.host_if, "up")
            self.child("ip", "link", "set", "lo", "up")
            self.child("ip", "addr", "add", f"{self.child_ip}/24", "dev", self.child_if)
            self.child("ip", "link", "set", self.child_if, "up")
            self.child("ip", "route", "add", "default", "via", self.host_ip)
        except Exception:
            self.close()
            raise
        return self

    def argv(self, *argv: str) -> list[str]:
        """`argv` wrapped to run inside the child namespace."""
        return ["nsenter", "-t", str(self.pid), "-n", "--", *argv]

    def child(self, *argv: str) -> None:
        _run(*self.argv(*argv))

    def shape(self, netem: Optional[str], *, down: bool = True, up: bool = True) -> None:
        """Applies `tc qdisc ... netem <netem>` (e.g. "rate 300kbit limit 40", "loss 2%") to the
        downstream and/or upstream direction; `None` removes the shaping again."""
        for enabled, wrap, dev in ((down, (), self.host_if), (up, "child", self.child_if)):
            if not enabled and netem is not None:
                continue
            prefix = self.argv() if wrap else []
            if netem is None:
                subprocess.run(
                    [*prefix, "tc", "qdisc", "del", "dev", dev, "root"],
                    capture_output=True, timeout=20,
                )
            else:
                _run(*prefix, "tc", "qdisc", "replace", "dev", dev, "root", "netem", *netem.split())

    def close(self) -> None:
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, timeout=20)
        if self.holder is not None and self.holder.poll() is None:
            self.holder.kill()
            self.holder.wait(timeout=10)

    def __enter__(self) -> "ChildNet":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
