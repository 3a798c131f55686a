"""Smoke test of `arbor-load` (issue 5): keeps the load tool working, measures nothing.

One short livestream run (1 publisher, 3 subscribers, an 8 s window) of the real load tool against
a fresh `arbor --dev`: webrtc-rs participants join over `/rtc`, publish the looped VP8 + Opus clip
and receive it. The tool must exit 0 (its `--require-loss-below` makes it fail if any step received
nothing or lost too much), and the CSV row must show media flowing to all six subscriptions.
Benchmark figures (CPU per packet, ratios to the relay and Janus) belong to `scripts/bench`, never
here: the only numeric checks are generous sanity bounds.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import start_arbor, stop_arbor

ROOT = Path(__file__).resolve().parents[2]


def load_binary() -> Path:
    path = Path(os.environ.get("ARBOR_LOAD_BIN") or ROOT / "target" / "debug" / "arbor-load")
    if not path.exists():
        pytest.fail(f"arbor-load not found at {path}: run `cargo build -p arbor-load` or set ARBOR_LOAD_BIN")
    return path


@pytest.fixture
def arbor_bound(request: pytest.FixtureRequest, tmp_path: Path):
    """`arbor --dev` with its media socket bound to the node address (not 0.0.0.0).

    Server and clients share one namespace here, so a reply from a socket bound to 0.0.0.0 to a
    client on 10.200.0.2 leaves with source 10.200.0.2 (the kernel picks the destination's own
    local address); webrtc-rs then drops the STUN response as coming from an unknown remote.
    """
    cfg = tmp_path / "arbor.yaml"
    cfg.write_text(f"rtc:\n  bind: {os.environ.get('ARBOR_NODE_IP', '10.200.0.1')}\n")
    server = start_arbor("test_load_tool", ("--config", str(cfg)))
    request.node.arbor_servers = [server]
    yield server
    died = not server.alive()
    stop_arbor(server)
    if died:
        pytest.fail("arbor died during the load-tool smoke test", pytrace=False)


@pytest.mark.timeout(120)
def test_load_tool_livestream_smoke(arbor_bound, tmp_path: Path, results) -> None:
    arbor = arbor_bound
    csv = tmp_path / "smoke.csv"
    args = [
        str(load_binary()), "run",
        "--target", "arbor",
        "--scenario", "livestream",
        "--url", arbor.ws_url,
        "--server-pid", str(arbor.pid),
        "--bind-ip", os.environ.get("ARBOR_CLIENT_IP", "10.200.0.2"),
        "--steps", "3",
        "--step-secs", "8",
        "--settle-secs", "1",
        "--quiet",
        "--require-loss-below", "5",
        "--csv", str(csv),
    ]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=100)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"arbor-load failed ({proc.returncode}):\n{out[-4000:]}"
    lines = csv.read_text().strip().splitlines()
    assert len(lines) == 2, f"expected a header and one row:\n{csv.read_text()}"
    header = lines[0].split(",")
    row = dict(zip(header, lines[1].split(",")))
    assert row["target"] == "arbor" and row["scenario"] == "livestream"
    assert int(row["subscriptions"]) == 6
    # The clip sends ~60 video + 50 audio packets/s; 3 subscribers should see ~330/s. Generous floor.
    assert float(row["fwd_pps"]) > 100, row
    assert float(row["server_cpu_pct"]) > 0, row
    assert int(row["join_failures"]) == 0, row
    results(
        f"arbor-load smoke: {float(row['fwd_pps']):.0f} pkt/s to 6 subscriptions, "
        f"server {float(row['cpu_us_per_pkt']):.1f} us/pkt (debug build), loss {row['loss_pct']}%, "
        f"join p50 {row['join_p50_ms']} ms"
    )
