"""Tests of the emulated WAN fixture (`wan.Wan`, the `arbor-wan` emulator): what other tests rely
on when they put Arbor nodes in sites with delay and loss between them.

* a round trip gains 2 x the configured one-way delay (ping, and a UDP echo probe), never less;
* `set_link` changes apply at runtime, per pair, and leave other pairs alone;
* loss drops the configured fraction (binomial bounds), counted exactly in `stats()`, and the
  same seed drops the same packets;
* TCP and UDP work across it, TCP even with loss;
* thousands of packets per second pass with no overflow, and we record how late the emulator
  releases packets (its own measurement) next to the RTTs the probes see;
* the emulator stops by itself when the process that started it dies.

Timing assertions are generous sanity bounds (a shared 2-core machine compiles while this runs);
the measured numbers go to tests/e2e/.work/results.txt.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import textwrap
import time

import pytest

from wan import Wan, wan_binary

PY = sys.executable

# A UDP echo server: echoes every datagram, exits after `idle` seconds without one.
ECHO = textwrap.dedent(r"""
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, 33, 4 << 20)  # SO_RCVBUFFORCE
    s.bind(("0.0.0.0", int(sys.argv[1])))
    s.settimeout(float(sys.argv[2]))
    print("ready", flush=True)
    try:
        while True:
            data, addr = s.recvfrom(4096)
            s.sendto(data, addr)
    except socket.timeout:
        pass
""")

# A UDP sink: counts datagrams, prints the count after `idle` seconds without one.
SINK = textwrap.dedent(r"""
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, 33, 4 << 20)  # SO_RCVBUFFORCE
    s.bind(("0.0.0.0", int(sys.argv[1])))
    print("ready", flush=True)
    s.settimeout(30)
    n = 0
    try:
        while True:
            s.recv(4096)
            n += 1
            s.settimeout(float(sys.argv[2]))
    except socket.timeout:
        pass
    print(n, flush=True)
""")

# Sends `count` datagrams at `rate` per second (in 1 ms batches), each carrying its sequence
# number and send time; with `echo`, collects the echoes and prints the round-trip times (ms).
PROBE = textwrap.dedent(r"""
    import json, socket, struct, sys, threading, time
    host, port, count, rate, size, echo = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "1"
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, 33, 4 << 20)  # SO_RCVBUFFORCE
    s.connect((host, port))
    rtts = []
    def rx():
        s.settimeout(3.0)
        while len(rtts) < count:
            try:
                data = s.recv(4096)
            except socket.timeout:
                return
            now = time.monotonic_ns()
            seq, sent = struct.unpack("!QQ", data[:16])
            rtts.append((now - sent) / 1e6)
    t = threading.Thread(target=rx)
    if echo:
        t.start()
    pad = b"x" * max(0, size - 16)
    start = time.monotonic()
    sent = 0
    while sent < count:
        due = min(count, int((time.monotonic() - start) * rate) + 1)
        while sent < due:
            s.send(struct.pack("!QQ", sent, time.monotonic_ns()) + pad)
            sent += 1
        time.sleep(0.001)
    elapsed = time.monotonic() - start
    if echo:
        t.join()
    print(json.dumps({"sent": sent, "seconds": elapsed, "rtts": rtts}))
""")

# TCP: the server hashes everything it receives and answers with the digest.
TCP_SERVER = textwrap.dedent(r"""
    import hashlib, socket, sys
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", int(sys.argv[1])))
    srv.listen(1)
    srv.settimeout(60)
    print("ready", flush=True)
    conn, _ = srv.accept()
    conn.settimeout(60)
    h, n = hashlib.sha256(), 0
    while True:
        data = conn.recv(65536)
        if not data:
            break
        h.update(data)
        n += len(data)
    conn.sendall(f"{n} {h.hexdigest()}".encode())
    conn.close()
""")

TCP_CLIENT = textwrap.dedent(r"""
    import hashlib, json, socket, sys, time
    host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    payload = bytes((i * 7 + i // 251) & 0xff for i in range(size))
    t0 = time.monotonic()
    c = socket.create_connection((host, port), timeout=60)
    c.sendall(payload)
    c.shutdown(socket.SHUT_WR)
    answer = b""
    while True:
        data = c.recv(4096)
        if not data:
            break
        answer += data
    print(json.dumps({"answer": answer.decode(), "expected": f"{size} {hashlib.sha256(payload).hexdigest()}",
                      "seconds": time.monotonic() - t0}))
""")


@pytest.fixture(autouse=True)
def _need_binary():
    if not wan_binary().is_file():
        pytest.fail(f"arbor-wan not found at {wan_binary()}: run `cargo build -p arbor-load --bin arbor-wan` "
                    "or set ARBOR_E2E_WAN_BIN")


def _server(wan: Wan, site: str, script: str, *args: str) -> subprocess.Popen:
    """Starts a Python script in `site` and waits for its `ready` line."""
    proc = wan.popen(site, [PY, "-c", script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    if line != "ready":
        proc.kill()
        raise RuntimeError(f"server in {site} did not start: {line!r} {proc.stderr.read()}")
    return proc


def _python(wan: Wan, site: str, script: str, *args: str, timeout: float = 60) -> str:
    r = subprocess.run(wan.argv(site, PY, "-c", script, *args), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"script in {site} failed: {r.stderr}"
    return r.stdout


def _ping(wan: Wan, src: str, dst: str, count: int = 10) -> dict:
    """ping statistics (ms) from `src` to `dst`: min, avg, max, mdev, and the packets received."""
    r = subprocess.run(wan.argv(src, "ping", "-n", "-c", str(count), "-i", "0.05", "-W", "3", wan.ip(dst)),
                       capture_output=True, text=True, timeout=60)
    received = re.search(r"(\d+) received", r.stdout)
    rtt = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms", r.stdout)
    assert received and rtt, f"ping {src} -> {dst} failed ({r.returncode}): {r.stdout} {r.stderr}"
    mn, avg, mx, mdev = map(float, rtt.groups())
    return {"min": mn, "avg": avg, "max": mx, "mdev": mdev, "received": int(received.group(1))}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def test_ping_shows_the_configured_rtt_per_pair(results):
    with Wan(["a", "b", "c"]) as wan:
        assert [wan.ip(s) for s in "abc"] == ["10.210.1.2", "10.210.2.2", "10.210.3.2"]
        base = _ping(wan, "a", "b")
        wan.set_link("a", "b", delay_ms=25)
        wan.set_link("a", "c", delay_ms=5)
        ab, ac, bc = _ping(wan, "a", "b"), _ping(wan, "a", "c"), _ping(wan, "b", "c")
        results(f"wan ping RTT: no delay {base['avg']:.3f} ms; 25 ms each way -> min/avg/max "
                f"{ab['min']:.2f}/{ab['avg']:.2f}/{ab['max']:.2f} ms; 5 ms -> {ac['avg']:.2f} ms; "
                f"untouched pair {bc['avg']:.3f} ms")
        assert base["received"] == 10 and base["avg"] < 10, base
        # Never early: a round trip is held 2 x delay. Generous upper bound: a busy machine.
        assert ab["received"] == 10 and ab["min"] >= 50.0 and ab["avg"] < 50 + 15, ab
        assert ac["received"] == 10 and ac["min"] >= 10.0 and ac["avg"] < 10 + 15, ac
        assert bc["received"] == 10 and bc["avg"] < 10, f"b <-> c has no delay configured: {bc}"
        # Changes apply at runtime; a perfect link again.
        wan.set_link("a", "b")
        again = _ping(wan, "a", "b")
        assert again["avg"] < 10, again
        stats = wan.stats()
        assert stats[("a", "b")]["forwarded"] >= 30 and stats[("b", "a")]["forwarded"] >= 30, stats
        assert stats[("a", "b")]["dropped"] == 0 and stats[("a", "b")]["queued"] == 0, stats


def test_udp_echo_rtt_and_emulator_precision_at_thousands_of_packets_per_second(results):
    """5000 echoes/s for 2 s through 10 ms each way: 20 000 packets through the emulator."""
    delay, rate, count = 10.0, 5000, 10_000
    with Wan(["a", "b"]) as wan:
        wan.set_link("a", "b", delay_ms=delay)
        echo = _server(wan, "b", ECHO, "7000", "5")
        try:
            out = json.loads(_python(wan, "a", PROBE, wan.ip("b"), "7000", str(count), str(rate), "200", "1"))
        finally:
            echo.kill()
            echo.wait()
        raw = wan.raw_stats()
    rtts = out["rtts"]
    ab = next(p for p in raw["pairs"] if p["src"] == "a")
    ba = next(p for p in raw["pairs"] if p["src"] == "b")
    late = raw["lateness"]
    mean_late_us = late["total_ns"] / max(1, late["count"]) / 1e3
    within_500us = sum(late["buckets"][:3]) / max(1, late["count"])
    results(f"wan UDP echo {count} at {out['sent'] / out['seconds']:.0f}/s, {delay:.0f} ms each way: "
            f"{len(rtts)} echoed; RTT min/p50/p99/max {min(rtts):.2f}/{_percentile(rtts, 0.5):.2f}/"
            f"{_percentile(rtts, 0.99):.2f}/{max(rtts):.2f} ms; emulator lateness mean "
            f"{mean_late_us:.0f} us, max {late['max_ns'] / 1e3:.0f} us, {within_500us:.1%} within 500 us "
            f"(buckets <100/250/500/1000/2000/5000/more us: {late['buckets']})")
    assert out["sent"] == count
    assert ab["forwarded"] == count and ba["forwarded"] == count, (ab, ba)
    assert ab["overflow"] == ba["overflow"] == 0 and raw["write_errors"] == 0, raw
    assert len(rtts) == count, f"{count - len(rtts)} echoes missing on a loss-free link"
    assert min(rtts) >= 2 * delay, f"an echo came back in {min(rtts):.3f} ms < 2 x {delay} ms"
    assert _percentile(rtts, 0.5) < 2 * delay + 10, f"median RTT {_percentile(rtts, 0.5):.2f} ms"
    assert late["count"] == 2 * count


def test_loss_fraction_is_binomial_counted_exactly_and_seeded(results):
    n, p = 2000, 0.1
    drops = []
    for _ in range(2):  # the same seed twice: the same packets are lost
        with Wan(["a", "b", "c"], seed=11) as wan:
            wan.set_link("a", "b", delay_ms=2, loss=p)
            sink = _server(wan, "b", SINK, "7001", "1.5")
            _python(wan, "a", PROBE, wan.ip("b"), "7001", str(n), "4000", "100", "0")
            received = int(sink.communicate(timeout=30)[0].strip())
            stats = wan.stats()
        ab = stats[("a", "b")]
        drops.append(ab["dropped"])
        # Every packet accounted for: dropped by the link or forwarded, and every forwarded one
        # arrived.
        assert ab["forwarded"] + ab["dropped"] == n and ab["overflow"] == 0, ab
        assert received == ab["forwarded"], (received, ab)
        assert stats[("b", "a")]["forwarded"] == 0 and stats[("a", "c")]["forwarded"] == 0, stats
        # Binomial(2000, 0.1): mean 200, sd 13.4; 5 sd either side.
        sd = (n * p * (1 - p)) ** 0.5
        assert abs(ab["dropped"] - n * p) < 5 * sd, f"{ab['dropped']} of {n} lost at {p:.0%}"
    results(f"wan loss {p:.0%} over {n} packets: dropped {drops[0]} and {drops[1]} (same seed)")
    assert drops[0] == drops[1], f"seed 11 dropped {drops} in two runs"


def test_tcp_and_udp_work_across_delay_and_loss(results):
    size = 1 << 20
    with Wan(["a", "b"]) as wan:
        wan.set_link("a", "b", delay_ms=10, loss=0.02)
        srv = _server(wan, "b", TCP_SERVER, "7002")
        try:
            out = json.loads(_python(wan, "a", TCP_CLIENT, wan.ip("b"), "7002", str(size), timeout=120))
        finally:
            srv.kill()
            srv.wait()
        stats = wan.stats()
        echo = _server(wan, "b", ECHO, "7003", "3")
        try:
            udp = json.loads(_python(wan, "a", PROBE, wan.ip("b"), "7003", "200", "500", "1200", "1"))
        finally:
            echo.kill()
            echo.wait()
    results(f"wan TCP 1 MiB over 20 ms RTT, 2% loss: {out['seconds']:.2f} s; "
            f"{stats[('a', 'b')]['dropped'] + stats[('b', 'a')]['dropped']} segments lost")
    assert out["answer"] == out["expected"], out
    assert stats[("a", "b")]["dropped"] > 0, f"2% loss dropped nothing: {stats}"
    # UDP with 2% loss each way: about 4% of 200 echoes missing; far from all.
    assert 150 <= len(udp["rtts"]) <= 200, len(udp["rtts"])
    assert min(udp["rtts"]) >= 20.0


def test_the_callers_own_namespace_can_join_as_a_site(results):
    """`local=`: in-process code (like the LiveKit SDK clients of other tests) reaches the sites
    through the emulator."""
    with Wan(["a", "b"], local="here") as wan:
        assert wan.ip("here") == "10.210.0.2" and wan.argv("here", "true") == ["true"]
        wan.set_link("here", "a", delay_ms=15)
        here_a, here_b = _ping(wan, "here", "a"), _ping(wan, "here", "b")
        echo = _server(wan, "a", ECHO, "7004", "3")
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.settimeout(5)
            t0 = time.monotonic()
            sock.sendto(b"hello", (wan.ip("a"), 7004))
            data, peer = sock.recvfrom(100)
            rtt_ms = (time.monotonic() - t0) * 1e3
            sock.close()
        finally:
            echo.kill()
            echo.wait()
        stats = wan.stats()
    results(f"wan local site: ping 15 ms each way -> {here_a['avg']:.2f} ms, no delay -> {here_b['avg']:.3f} ms; "
            f"in-process UDP echo {rtt_ms:.2f} ms")
    assert here_a["received"] == 10 and here_a["min"] >= 30 and here_a["avg"] < 30 + 15, here_a
    assert here_b["received"] == 10 and here_b["avg"] < 10, here_b
    assert data == b"hello" and peer == ("10.210.1.2", 7004) and rtt_ms >= 30
    assert stats[("here", "a")]["forwarded"] >= 11 and stats[("a", "here")]["forwarded"] >= 11, stats
    # Gone with the Wan: nothing left in the suite's namespace.
    assert subprocess.run(["ip", "link", "show", "wanl"], capture_output=True).returncode != 0
    assert "10.210." not in subprocess.run(["ip", "route"], capture_output=True, text=True).stdout


def test_idle_emulator_sleeps(results):
    """No busy loop: with nothing to forward (and while packets wait for a long delay) the
    emulator uses next to no CPU."""
    with Wan(["a", "b"]) as wan:
        wan.set_link("a", "b", delay_ms=1500)
        pid = wan.emulator.pid
        ping = subprocess.Popen(wan.argv("a", "ping", "-n", "-c", "1", "-W", "15", wan.ip("b")),
                                stdout=subprocess.PIPE, text=True)
        t0, cpu0 = time.monotonic(), _cpu_ticks(pid)
        time.sleep(2.0)
        cpu = _cpu_ticks(pid) - cpu0
        elapsed = time.monotonic() - t0
        out = ping.communicate(timeout=25)[0]
    ticks = os.sysconf("SC_CLK_TCK")
    results(f"wan idle emulator: {cpu / ticks * 1e3:.0f} ms CPU in {elapsed:.1f} s")
    assert cpu / ticks < 0.1 * elapsed, f"{cpu} ticks of CPU in {elapsed:.1f} s idle: a busy loop?"
    assert "1 received" in out and "time=3" in out, f"a 3 s round trip expected: {out}"


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime (fields 14 and 15 of stat)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        Wan([])
    with pytest.raises(ValueError):
        Wan(["a", "a"])
    with pytest.raises(ValueError):
        Wan(["bad name"])
    with pytest.raises(ValueError):
        Wan(["a"], local="a")
    with Wan(["a", "b"]) as wan:
        with pytest.raises(KeyError):
            wan.ip("zz")
        with pytest.raises(KeyError):
            wan.set_link("a", "zz", delay_ms=1)
        for bad in ({"delay_ms": -1}, {"loss": 1.5}, {"delay_ms": float("nan")}, {"delay_ms": 1e9}):
            with pytest.raises(ValueError):
                wan.set_link("a", "b", **bad)
        with pytest.raises(ValueError):
            wan.set_link("a", "a", delay_ms=1)
        # The emulator's own checks (what a caller bypassing the fixture would hit).
        assert wan._command("link a b 10 2").startswith("error:")
        assert wan._command("link a nowhere 10 0").startswith("error:")
        assert wan._command("frobnicate").startswith("error:")
        wan.set_link("a", "b", delay_ms=1)  # still serving after bad input
        assert wan.stats()[("a", "b")]["forwarded"] == 0


def test_emulator_stops_when_its_parent_dies():
    script = textwrap.dedent(r"""
        import json, sys, time
        sys.path.insert(0, sys.argv[1])
        from wan import Wan
        wan = Wan(["a", "b"], max_seconds=60).start()
        pids = [wan.emulator.pid, wan.router.proc.pid] + [h.proc.pid for h in wan._holders.values()]
        print(json.dumps(pids), flush=True)
        time.sleep(60)
    """)
    here = os.path.dirname(os.path.abspath(__file__))
    parent = subprocess.Popen([PY, "-c", script, here], stdout=subprocess.PIPE, text=True)
    try:
        pids = json.loads(parent.stdout.readline())
    finally:
        parent.kill()
        parent.wait()
    emulator, holders = pids[0], pids[1:]
    try:
        deadline = time.monotonic() + 10
        while _running(emulator) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(emulator), "arbor-wan outlived the process that started it"
    finally:
        for pid in holders:  # the namespace holders are plain `sleep`s: ours to end
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")
