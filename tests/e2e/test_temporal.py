"""Issue 4, temporal layers: a subscriber's requested frame rate thins the stream in time.

The publisher is `livekit-client` in Debian Chromium: VP9 `L3T3_KEY` (one SVC stream, three
temporal layers: TL0 a quarter, TL0+TL1 half, all layers the full frame rate), or VP8 simulcast
(libwebrtc encodes each simulcast layer with three temporal layers, `L1T3`, and marks every
packet's layer in the VP8 payload descriptor). The subscriber is `livekit-client` in Chromium
too; it calls `RemoteTrackPublication.setVideoFPS(n)`, which sends `UpdateTrackSettings.fps`.

The server measures each temporal layer's frame rate and forwards, to that subscriber only, the
lowest temporal layer whose cumulative rate meets the request: its decoder must then produce a
fraction of the frame rate (at most 0.75x, and more than 2 fps), every frame with a readable
counter grid (a frame decoded against a reference the subscriber never got would not be), and
the full rate again once the subscriber asks for it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Optional

import pytest

from helpers import make_token
from quality_tools import Browser
from test_fabric import cluster3  # noqa: F401 - pytest fixture, used by name
from test_quality import (  # noqa: F401 - pytest fixtures, used by name
    FPS,
    PUBLISHER,
    arbor_open,
    camera_clip,
    page_base,
    start_browser_publisher,
)
from test_svc import start_svc_publisher


async def decoded_fps(browser: Browser, page: str, seconds: float) -> tuple[float, int, int]:
    """Decoded frames per second of the page's video over `seconds` (the decoder's own
    `framesDecoded`), and the readable / unreadable counter-grid frames in that time."""
    a = await browser.video(page)
    ga = (await browser.state(page))["grid"]
    t0 = time.monotonic()
    await asyncio.sleep(seconds)
    b = await browser.video(page)
    gb = (await browser.state(page))["grid"]
    dt = time.monotonic() - t0
    fps = round((b["framesDecoded"] - a["framesDecoded"]) / dt, 1)
    return fps, gb["readable"] - ga["readable"], gb["unreadable"] - ga["unreadable"]


async def settle(browser: Browser, page: str, ok, timeout: float) -> tuple[float, tuple[float, int, int]]:
    """Measures 3 s windows until `ok(fps)` holds for one; returns (seconds it took, the window)."""
    t0 = time.monotonic()
    while True:
        m = await decoded_fps(browser, page, 3.0)
        if ok(m[0]):
            return round(time.monotonic() - t0, 1), m
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"decoded fps never reached the expected range within {timeout:.0f} s: last {m}")


async def check_fps_follows_request(browser: Browser, label: str, results, publisher: str) -> None:
    """The shared scenario: full rate, then `setVideoFPS(FPS / 4)` and `(FPS / 2)`, then back."""
    # Full rate first (the subscriber asked for nothing): the reference.
    await browser.set_fps("sub", 0)
    # The decoder's rate wobbles from window to window on a loaded machine: the better of two
    # windows is the reference.
    _, full = await settle(browser, "sub", lambda f: f >= 0.7 * FPS, 40)
    again = await decoded_fps(browser, "sub", 3.0)
    full = max(full, again)
    full_fps = full[0]
    steps = {"full": full}
    times = {}
    for want in (FPS // 4, FPS // 2):
        n = await browser.set_fps("sub", want)
        assert n >= 1, "the subscriber page has no video publication"
        took, m = await settle(browser, "sub", lambda f: 2.0 < f <= 0.75 * full_fps, 20)
        # One more window once settled: it must stay in range.
        m = await decoded_fps(browser, "sub", 4.0)
        steps[f"fps={want}"] = m
        times[f"fps={want}"] = took
        assert 2.0 < m[0] <= 0.75 * full_fps, f"{label}: asked {want} fps, decoding {m} (full {full_fps})"
        assert m[1] >= 8, f"{label}: too few readable frames at {want} fps: {m}"
    # Back to the full rate (0 = every layer, as when nothing was asked).
    await browser.set_fps("sub", FPS)
    took, back = await settle(browser, "sub", lambda f: f >= 0.85 * full_fps, 20)
    steps["back"] = back
    times["back"] = took
    grid = (await browser.state("sub"))["grid"]
    v = await browser.video("sub")
    results(
        f"temporal/{label} {FPS} fps publisher: decoded (fps, readable, unreadable) per step {steps}; "
        f"settle times (s) {times}; subscriber {grid['readable']}/{grid['frames']} readable "
        f"{grid['sizes']}, decoded {v.get('frameWidth')}x{v.get('frameHeight')}; publisher {publisher}"
    )
    assert grid["unreadable"] == 0, f"{label}: corrupt frames while thinning temporal layers: {grid}"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("codec", ["vp9", "av1"])
async def test_svc_temporal_layers_follow_requested_fps(arbor_open, page_base, camera_clip, results, codec):
    """VP9 (or AV1) L3T3_KEY: `setVideoFPS` lowers the decoded frame rate and raises it again."""
    room = f"temporal-{codec}"
    browser: Optional[Browser] = None
    try:
        browser = await start_svc_publisher(arbor_open, page_base, camera_clip, room, codec)
        await browser.open("sub", page_base, url=arbor_open.ws_url,
                           access_token=make_token("fps-viewer", room), role="subscribe", grid=1)
        rates = await browser.layer_rates("pub")
        await check_fps_follows_request(browser, f"{codec} L3T3_KEY", results, str(rates))
    finally:
        if browser:
            await browser.close()


@pytest.mark.timeout(240)
async def test_vp8_simulcast_temporal_layers_follow_requested_fps(arbor_open, page_base, camera_clip, results):
    """VP8 simulcast (each layer L1T3): `setVideoFPS` thins the forwarded simulcast layer."""
    room = "temporal-vp8"
    browser: Optional[Browser] = None
    try:
        browser = await start_browser_publisher(arbor_open, page_base, camera_clip, room)
        snd = await browser.sender("pub")
        modes = {rid: l.get("scalabilityMode") for rid, l in snd["layers"].items()}
        print(f"vp8 simulcast scalability modes: {modes}")
        await browser.open("sub", page_base, url=arbor_open.ws_url,
                           access_token=make_token("fps-viewer", room), role="subscribe", grid=1)
        await check_fps_follows_request(browser, "vp8 simulcast", results, f"modes {modes}")
    finally:
        if browser:
            await browser.close()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("codec", ["vp8", "vp9"])
async def test_temporal_layers_thinned_on_a_remote_node(cluster3, page_base, camera_clip, results, codec):
    """The publisher on node A, the subscriber on node C of a three-node cluster: the relay
    link carries every temporal layer (and, for Chromium's VP8, the dependency descriptor
    that names them), and node C thins them for its subscriber."""
    a_node, _b_node, c_node = cluster3.nodes
    room = f"temporal-remote-{codec}"
    browser: Optional[Browser] = None
    try:
        if codec == "vp8":
            browser = await start_browser_publisher(a_node, page_base, camera_clip, room)
        else:
            browser = await start_svc_publisher(a_node, page_base, camera_clip, room, codec)
        await browser.open("sub", page_base, url=c_node.ws_url,
                           access_token=make_token("fps-remote-viewer", room), role="subscribe", grid=1)
        await check_fps_follows_request(browser, f"{codec} on a remote node", results, "on node A")
        assert c_node.metric("arbor_relay_datagrams_received_total") > 0, "node C received nothing over the relay"
    finally:
        if browser:
            await browser.close()
