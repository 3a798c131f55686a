"""Issue 4, SVC: a layered (scalable) video stream thinned per subscriber.

The publisher is `livekit-client` in Debian Chromium with `videoCodec: 'vp9'` (libvpx) or
`'av1'` (libaom) and `scalabilityMode: 'L3T3_KEY'`: one RTP stream (one SSRC, no rids) carrying three spatial layers
(1/4, 1/2 and full size) with three temporal layers each, upper spatial layers predicted from
lower ones only in keyframes. Its fake camera plays the counter-grid clip of test_quality, so
every frame a subscriber decodes is checked (helpers.read_counter).

Two Python SDK subscribers watch at the same time (and later a Chromium page, by resolution), each asking for a quality
(`set_video_quality`, mapped through the TrackInfo's three SVC layers like simulcast): the server
must drop, per subscriber, the spatial layers above the one it asked for (the decoded frames have
that layer's size, and the low subscriber receives fewer bytes), switch layers up at a keyframe and
down at a picture boundary, mark the end of each thinned picture so the decoder emits it, and keep
sequence numbers continuous over the dropped packets. No frame may fail the counter check.

VP9 layers are read from the VP9 payload descriptor, AV1 layers from the dependency
descriptor header extension (negotiated; livekit-client adds it to its offer for SVC codecs).
"""

from __future__ import annotations

import asyncio
import time
from typing import Optional

import pytest

from conftest import WORK
from helpers import make_token
from quality_tools import Browser, SubProc
from test_quality import (  # noqa: F401 - pytest fixtures, used by name
    FPS,
    H,
    PUBLISHER,
    W,
    arbor_open,
    camera_clip,
    page_base,
)

# The three spatial layers of L3T3_KEY for a W x H capture (each half the size of the next).
S0, S1, S2 = (W // 4, H // 4), (W // 2, H // 2), (W, H)


async def start_svc_publisher(server, page_base: str, clip, room: str, codec: str) -> Browser:
    """Chromium publishing the clip as one SVC stream; waits until it encodes at full size."""
    browser = await Browser().start(video_file=clip)
    st = await browser.open(
        "pub", page_base, url=server.ws_url, access_token=make_token(PUBLISHER, room),
        role="svc", codec=codec, width=W, height=H, fps=FPS,
    )
    print(f"svc publisher: capture {st.get('capture')} published {st['published']} can encode {st.get('sendCodecs')}")
    deadline = time.monotonic() + 45
    while True:
        snd = await browser.sender("pub")
        layers = list(snd["layers"].values())
        if layers and layers[0]["frameWidth"] == W:
            print(f"svc sender: {snd}")
            return browser
        if time.monotonic() > deadline:
            await browser.close()
            raise AssertionError(f"the browser did not encode {codec} at {W}x{H} within 45 s: {snd}")
        await asyncio.sleep(0.5)


async def wait_layer(sub: SubProc, size: tuple[int, int], timeout: float, periods: int = 4) -> float:
    """Waits until, in each of the last `periods` reports, the subscriber decoded frames of
    the layer `size` and none larger; returns when the first of them was reported.

    "None larger" is what thinning guarantees. Frames *smaller* than the target are allowed:
    the encoder itself skips upper layer frames when it is short of CPU or bits (libaom and
    libvpx both do, measured here on a loaded 2-core machine), and the decoder then shows the
    highest layer the picture has. Sizes within 2 pixels count (960x540 / 4 decodes as
    240x136 with libvpx)."""

    def dims(key: str) -> Optional[tuple[int, int]]:
        try:
            w, h = (int(v) for v in key.split("x"))
        except ValueError:
            return None
        return w, h

    def fits(report: dict) -> bool:
        sizes = [dims(k) for k in report["sizes"]]
        if not sizes or any(d is None for d in sizes):
            return False
        at_target = any(abs(w - size[0]) <= 2 and abs(h - size[1]) <= 2 for w, h in sizes)
        larger = any(w > size[0] + 2 or h > size[1] + 2 for w, h in sizes)
        return at_target and not larger

    def ok(sp: SubProc) -> Optional[float]:
        tail = sp.stats[-periods:]
        if len(tail) == periods and all(fits(s) for s in tail):
            return tail[0]["t"]
        return None

    return await sub.wait(ok, timeout, f"frames of the {size[0]}x{size[1]} layer, none larger")


async def start_low_high(low: SubProc, high: SubProc, ws_url: str, room: str,
                         subscribed_timeout: float, layer_timeout: float) -> None:
    """Starts the two Python subscribers on `ws_url`, `low` asking for the low quality and
    `high` for the high one, and waits until each decodes its layer (S0, S2)."""
    for sub, quality in ((low, "low"), (high, "high")):
        await sub.start(ws_url, make_token(sub.label, room), PUBLISHER, initial_quality=quality, dump_dir=WORK)
    for sub in (low, high):
        await sub.wait(lambda p: any(e.get("ev") == "subscribed" for e in p.events), subscribed_timeout,
                       "track_subscribed")
    first = await asyncio.gather(wait_layer(low, S0, layer_timeout), wait_layer(high, S2, layer_timeout),
                                 return_exceptions=True)
    if any(isinstance(r, BaseException) for r in first):
        raise AssertionError(f"first layers not reached on {ws_url}: {first}\n{low.describe(6)}\n{high.describe(6)}")


def _kbps(sub: SubProc, since: float) -> Optional[float]:
    """Received video kbit/s between the first and last report after `since`."""
    rows = [s for s in sub.frames_since(since) if (s.get("inbound") or {}).get("bytes_received") is not None]
    if len(rows) < 2:
        return None
    a, b = rows[0], rows[-1]
    dt = b["t"] - a["t"]
    if dt <= 0:
        return None
    return round((b["inbound"]["bytes_received"] - a["inbound"]["bytes_received"]) * 8 / dt / 1000, 1)


def _fps(sub: SubProc, since: float) -> float:
    rows = sub.frames_since(since)
    if len(rows) < 2:
        return 0.0
    frames = sum(sum(s["sizes"].values()) for s in rows[1:])
    return round(frames / max(0.001, rows[-1]["t"] - rows[0]["t"]), 1)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("codec", ["vp9", "av1"])
async def test_svc_layers_dropped_per_subscriber(arbor_open, page_base, camera_clip, results, codec):
    """Two Python subscribers of one VP9 (or AV1) L3T3_KEY track: `low` decodes the base spatial layer
    (W/4 x H/4) while `high` decodes full size, from the same stream at the same time; then they
    swap (low -> high needs a keyframe, high -> low happens at the next picture), and `low` goes
    through the middle layer. Every decoded frame carries a readable counter."""
    room = f"svc-{codec}"
    browser: Optional[Browser] = None
    low, high = SubProc("svc-low"), SubProc("svc-high")
    try:
        browser = await start_svc_publisher(arbor_open, page_base, camera_clip, room, codec)
        snd = await browser.sender("pub")
        layer = list(snd["layers"].values())[0]
        assert (layer.get("mimeType") or "").lower() == f"video/{codec}", f"not publishing {codec}: {snd}"
        assert layer.get("scalabilityMode") in (None, "L3T3_KEY"), f"unexpected scalability mode: {snd}"
        await start_low_high(low, high, arbor_open.ws_url, room, 30, 40)
        # Both steady: measure what each receives over a few seconds.
        t = time.monotonic()
        await asyncio.sleep(4)
        steady = {
            "low": (f"{S0[0]}x{S0[1]}", _kbps(low, t), _fps(low, t)),
            "high": (f"{S2[0]}x{S2[1]}", _kbps(high, t), _fps(high, t)),
        }
        print(f"steady (size, kbit/s, fps): {steady}")

        async def to(sub: SubProc, quality: str, size: tuple[int, int]) -> float:
            t0 = time.monotonic()
            await sub.set_quality(quality)
            return round(await wait_layer(sub, size, 30) - t0, 1)

        # Swap: low goes up (waits for a keyframe), high goes down (next picture).
        up, down = await asyncio.gather(to(low, "high", S2), to(high, "low", S0))
        # The former low subscriber steps down through the middle layer.
        mid = await to(low, "medium", S1)
        back = await to(low, "high", S2)

        # A Chromium subscriber as well (a second decoder; the page reads the counter grid of
        # every decoded frame): by resolution, as adaptive stream asks, base layer then full.
        await browser.open("sub", page_base, url=arbor_open.ws_url,
                           access_token=make_token("svc-browser", room), role="subscribe", grid=1)
        br_times = []
        for size in (S0, S2):
            t0 = time.monotonic()
            while True:
                n = await browser.set_dimensions("sub", *size)
                v = await browser.video("sub")
                w = v.get("frameWidth") or 0
                if n and abs(w - size[0]) <= 2:
                    br_times.append(round(time.monotonic() - t0, 1))
                    await asyncio.sleep(2.0)  # frames of this layer, grid-checked
                    break
                if time.monotonic() - t0 > 30:
                    raise AssertionError(f"browser asked {size}, decoding {v} after 30 s")
                await asyncio.sleep(0.5)
        grid = (await browser.state("sub"))["grid"]
        await asyncio.sleep(1.0)

        report = []
        for s in (low, high):
            last = s.last
            ib = last.get("inbound") or {}
            print(s.describe(8))
            report.append(
                f"{s.label} {last['readable']}/{last['frames']} readable (pli={ib.get('pli_count')} "
                f"nack={ib.get('nack_count')} lost={ib.get('packets_lost')} freezes={ib.get('freeze_count')})"
            )
        rates = await browser.layer_rates("pub")
        results(
            f"svc/{codec} L3T3_KEY {W}x{H}@{FPS}: steady (size, kbit/s, fps) {steady}; switch times (s): "
            f"low->high {up}, high->low {down}, high->medium {mid}, medium->high {back}; "
            f"{'; '.join(report)}; browser by resolution (s to the layer) {br_times}, "
            f"{grid['readable']}/{grid['frames']} readable {grid['sizes']}; publisher {rates}"
        )
        for s in (low, high):
            last = s.last
            assert last["readable"] >= 100, f"{s.label}: only {last['readable']} readable frames"
            assert last["unreadable"] == 0, (
                f"{s.label}: corrupt frames after SVC layer switches: {last['unreadable']} of "
                f"{last['frames']} {s.unreadable()[:6]}"
            )
        assert grid["readable"] >= 30 and grid["unreadable"] == 0, f"browser subscriber: {grid}"
        lo_kbps, hi_kbps = steady["low"][1], steady["high"][1]
        assert lo_kbps is not None and hi_kbps is not None, f"no byte counters: {steady}"
        # The base layer is a fraction of the whole stream; "less than 60%" is a generous bound.
        assert lo_kbps < 0.6 * hi_kbps, f"the low subscriber was not thinned: {steady}"
    finally:
        await low.close()
        await high.close()
        if browser:
            await browser.close()

