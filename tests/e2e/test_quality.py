"""Issue 4: media quality with real clients — simulcast layer choice, bandwidth adaptation,
dynacast, active speakers, connection quality.

The publisher of simulcast video is `livekit-client` 2.23 in Debian Chromium (three VP8 layers
q/h/f = 320x180 / 640x360 / 960x540, dynacast on), whose fake camera plays a Y4M clip carrying the
counter grid of helpers.py: every frame any subscriber decodes, on any layer, is checked. The
subscribers are Python SDK processes (clients/quality_sub.py). A subscriber whose network is
impaired runs in a child network namespace with its own veth link (netns.ChildNet), shaped with
`tc netem`; the server listens on 0.0.0.0 so that it can signal too. Nothing leaves the namespaces
the suite creates.

Measured numbers (time to drop to the low layer, time back up, qualities seen) go to
tests/e2e/.work/results.txt through the `results` fixture.
"""

from __future__ import annotations

import asyncio
import functools
import http.server
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
from livekit import rtc

from conftest import WORK, start_arbor, stop_arbor, _safe_name
from helpers import TonePublisher, CounterVideoPublisher, connect, disconnect_all, make_token, wait_until
from netns import ChildNet
from quality_tools import JS, Browser, SubProc, write_counter_y4m

W, H, FPS = 960, 540, 20
LOW, MID, HIGH = (320, 180), (640, 360), (960, 540)
PUBLISHER = "browser-cam"
# Luma noise of the camera clip: enough that each layer needs a real camera's bitrate.
NOISE = 16


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def arbor_open(request: pytest.FixtureRequest):
    """Like conftest's `arbor`, but signalling listens on 0.0.0.0 so child namespaces reach it at
    ws://10.200.0.1:PORT (127.0.0.1 still works inside the test namespace)."""
    server = start_arbor(_safe_name(request.node.nodeid), bind="0.0.0.0")
    request.node.arbor_servers = [server]
    yield server
    died = not server.alive()
    returncode = server.proc.returncode
    stop_arbor(server)
    if died:
        pytest.fail(f"arbor died during the test (exit code {returncode})", pytrace=False)
    if "panicked at" in server.log_text():
        pytest.fail("arbor logged a Rust panic during the test", pytrace=False)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - signature fixed by the base class
        pass


@pytest.fixture(scope="module")
def page_base():
    """Serves js/public on 127.0.0.1 (a secure context, so getUserMedia works)."""
    if not (JS / "public" / "app.js").is_file():
        pytest.fail("js/public/app.js is missing: bundle it with esbuild (scripts/test does)")
    handler = functools.partial(_QuietHandler, directory=str(JS / "public"))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/index.html"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def camera_clip() -> Path:
    # 40 frames at 20 fps: a 2 s loop, 31 MB.
    return write_counter_y4m(WORK / f"counter-{W}x{H}.y4m", W, H, frames=40, fps=FPS, noise=NOISE)


async def start_browser_publisher(server, page_base: str, clip: Path, room: str) -> Browser:
    """Chromium publishing the clip with three simulcast layers; waits until all three encode."""
    browser = await Browser().start(video_file=clip)
    st = await browser.open(
        "pub", page_base, url=server.ws_url, access_token=make_token(PUBLISHER, room),
        role="simulcast", width=W, height=H, fps=FPS,
    )
    print(f"browser publisher: capture {st.get('capture')} published {st['published']}")
    deadline = time.monotonic() + 45
    while True:
        snd = await browser.sender("pub")
        sizes = {rid: (l["frameWidth"], l["frameHeight"]) for rid, l in snd["layers"].items()}
        if {"q", "h", "f"} <= set(sizes) and all(w > 0 for w, _ in sizes.values()):
            print(f"browser layers: {sizes}")
            print(f"browser layer rates: {await browser.layer_rates('pub')}")
            return browser
        if time.monotonic() > deadline:
            await browser.close()
            raise AssertionError(f"the browser did not encode three layers within 45 s: {snd}")
        await asyncio.sleep(0.5)


def readable_fraction(sp: SubProc) -> tuple[int, int]:
    s = sp.last
    return s.get("readable", 0), s.get("unreadable", 0)


# ---------------------------------------------------------------------------------------------
# 1. Subscriber-requested layer
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(150)
async def test_subscriber_chooses_simulcast_layer(arbor_open, page_base, camera_clip, results):
    room = "q-layers"
    browser: Optional[Browser] = None
    sub = SubProc("sub-low")
    try:
        browser = await start_browser_publisher(arbor_open, page_base, camera_clip, room)
        await sub.start(arbor_open.ws_url, make_token("sub-low", room), PUBLISHER, initial_quality="low", dump_dir=WORK)
        await sub.wait(lambda s: any(e.get("ev") == "subscribed" for e in s.events), 30, "track_subscribed")
        t_low = await sub.wait_size(*LOW, 30, periods=4)
        print(f"low layer: {sub.describe(4)}")

        t0 = time.monotonic()
        await sub.set_quality("high")
        t_high = await sub.wait_size(*HIGH, 20, periods=4)
        up_s = t_high - t0

        t0 = time.monotonic()
        await sub.set_quality("medium")
        t_mid = await sub.wait_size(*MID, 20, periods=4)
        mid_s = t_mid - t0
        print(f"browser layer rates with one subscriber on MEDIUM: {await browser.layer_rates('pub')}")

        last = sub.last
        ib = last.get("inbound") or {}
        print(sub.describe(20))
        assert last["unreadable"] == 0, (
            f"{last['unreadable']} of {last['frames']} decoded frames were corrupt (counter grid unreadable): "
            f"{sub.unreadable()[:10]}"
        )
        assert last["readable"] >= 60, f"only {last['readable']} readable frames"
        assert ib.get("frames_decoded", 0) >= 60, ib
        results(
            f"quality/layers: sub asked LOW -> {LOW[0]}x{LOW[1]}; HIGH -> {HIGH[0]}x{HIGH[1]} in {up_s:.2f} s; "
            f"MEDIUM -> {MID[0]}x{MID[1]} in {mid_s:.2f} s; {last['readable']} frames all readable, "
            f"decoded={ib.get('frames_decoded')} dropped={ib.get('frames_dropped')} "
            f"freezes={ib.get('freeze_count')} pli={ib.get('pli_count')}"
        )
    finally:
        await sub.close()
        if browser:
            await browser.close()
