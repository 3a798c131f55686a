"""Issue 2, acceptance item 2: `livekit-client` 2.23.0 in headless Chromium publishes and subscribes.

`js/drive.mjs` (Node, playwright-core, Debian's /usr/bin/chromium) opens two pages of the bundled
app `js/public/`: one publishes Chromium's fake camera and microphone (simulcast, as the JS SDK does
by default), the other subscribes and renders. A Python SDK participant subscribes to the browser's
tracks as well and must decode its video. The page is served from 127.0.0.1 inside the namespace.
"""

from __future__ import annotations

import asyncio
import functools
import http.server
import json
import os
import threading
from pathlib import Path

import pytest
from livekit import rtc

from helpers import ToneReceiver, VideoReceiver, connect, disconnect_all, make_token, wait_until

HERE = Path(__file__).resolve().parent
JS = HERE / "js"
ROOM = "browser-room"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - signature fixed by the base class
        pass


@pytest.fixture
def page_server():
    """Serves js/public on 127.0.0.1 (a secure context, so getUserMedia works)."""
    if not (JS / "public" / "app.js").is_file():
        pytest.fail("js/public/app.js is missing: bundle it with `npx esbuild` (scripts/test does)")
    handler = functools.partial(_QuietHandler, directory=str(JS / "public"))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/index.html"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.timeout(240)
async def test_browser_publish_and_subscribe(arbor, page_server, results):
    py_room = None
    py_video = None
    py_audio = None
    proc = None
    try:
        py_room, py_events = await connect(arbor.ws_url, make_token("py-sub", ROOM), "py-sub")
        cfg = {
            "pageBase": page_server,
            "wsUrl": arbor.ws_url,
            "pubToken": make_token("browser-pub", ROOM),
            "subToken": make_token("browser-sub", ROOM),
            "watchSeconds": 10,
            "hardLimitSeconds": 300,
            "holdSeconds": 150,
        }
        proc = await asyncio.create_subprocess_exec(
            "node",
            str(JS / "drive.mjs"),
            json.dumps(cfg),
            cwd=str(JS),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=dict(os.environ),
        )
        stderr_lines: list[str] = []

        async def pump_stderr():
            async for raw in proc.stderr:
                line = raw.decode(errors="replace").rstrip()
                stderr_lines.append(line)
                print(line)

        stderr_task = asyncio.create_task(pump_stderr())

        # The driver reports its observations on one RESULT line, then keeps the browser pages
        # open until we close its stdin, so the Python subscriber can take its time.
        async def read_result():
            while True:
                raw = await proc.stdout.readline()
                if not raw:
                    return None
                line = raw.decode(errors="replace")
                if line.startswith("RESULT "):
                    return json.loads(line[len("RESULT ") :])

        result_task = asyncio.create_task(read_result())

        def driver_failed() -> bool:
            """Raises as soon as the browser side has failed, so its error is what we report."""
            if result_task.done():
                r = result_task.result()
                if r is None or r.get("error"):
                    raise AssertionError(f"browser driver failed: {r.get('error') if r else 'no RESULT'}")
            return False

        def browser_track(kind):
            found = py_events.find(
                "track_subscribed", lambda t, pub, p: p.identity == "browser-pub" and t.kind == kind
            )
            return found[0].args[0] if found else None

        # Python subscriber: decode the browser's camera and hear its microphone.
        track = await wait_until(
            lambda: driver_failed() or browser_track(rtc.TrackKind.KIND_VIDEO),
            90,
            "py-sub subscribed to the browser's video",
        )
        py_video = VideoReceiver(track, decode_every=1_000_000)  # frames, not counters
        await wait_until(
            lambda: driver_failed() or len(py_video.frames) >= 60, 90, "60 decoded browser frames at py-sub"
        )
        # Chromium's fake microphone beeps; the Python subscriber must hear some of it.
        track = await wait_until(
            lambda: driver_failed() or browser_track(rtc.TrackKind.KIND_AUDIO),
            30,
            "py-sub subscribed to the browser's audio",
        )
        py_audio = ToneReceiver(track, 1000.0)
        await wait_until(
            lambda: py_audio.samples_received >= 2 * 48000 and py_audio.loud_windows >= 1,
            30,
            "2 s of the browser's audio, with sound in it, at py-sub",
        )
        py_sizes = sorted({(f.width, f.height) for f in py_video.frames})
        print(f"py-sub decoded {len(py_video.frames)} frames, sizes {py_sizes}")
        assert all(w > 0 and h > 0 for w, h in py_sizes)

        result = await asyncio.wait_for(result_task, 200)
        assert result is not None, f"drive.mjs exited without a RESULT line ({await proc.wait()})"
        proc.stdin.close()
        await asyncio.wait_for(proc.wait(), 30)
        await asyncio.wait_for(stderr_task, 10)
        assert not result.get("error"), f"browser driver failed: {result['error']}"
        assert proc.returncode == 0

        pub, sub, samples = result["pub"], result["sub"], result["samples"]
        assert {t["kind"] for t in pub["published"]} >= {"audio", "video"}, pub["published"]
        kinds = {(t["identity"], t["kind"]) for t in sub["subscribed"]}
        assert ("browser-pub", "video") in kinds and ("browser-pub", "audio") in kinds, kinds
        assert samples[0]["videoWidth"] > 0 and samples[0]["videoHeight"] > 0, samples[0]
        decoded = [s["framesDecoded"] for s in samples]
        assert all(x <= y for x, y in zip(decoded, decoded[1:])), decoded
        grown = decoded[-1] - decoded[0]
        seconds = (samples[-1]["t"] - samples[0]["t"]) / 1000
        # The fake camera runs at 30 fps; on a starved machine Chromium encodes far fewer. Demand
        # steady progress, not a frame rate: >= 2 frames per second and growth in every half.
        assert grown >= 2 * seconds, f"framesDecoded grew by only {grown} in {seconds:.1f} s: {decoded}"
        mid = len(decoded) // 2
        assert decoded[mid] > decoded[0] and decoded[-1] > decoded[mid], f"decoding stalled: {decoded}"
        audio_samples = samples[-1]["audioSamplesReceived"] - samples[0]["audioSamplesReceived"]
        concealed = samples[-1]["audioConcealedSamples"] - samples[0]["audioConcealedSamples"]
        assert audio_samples >= 0.5 * 48000 * seconds, (
            f"the subscriber page played only {audio_samples} audio samples in {seconds:.1f} s"
        )
        assert concealed <= 0.5 * audio_samples, (
            f"{concealed} of {audio_samples} audio samples at the subscriber page were concealment"
        )
        results(
            f"browser: publisher connect {pub['connectMs']:.0f} ms, subscriber connect "
            f"{sub['connectMs']:.0f} ms, subscriber decoded {grown} frames in {seconds:.1f} s "
            f"at {samples[-1]['videoWidth']}x{samples[-1]['videoHeight']}; "
            f"page audio {audio_samples} samples ({concealed} concealed); "
            f"py-sub decoded {len(py_video.frames)} frames, {py_audio.samples_received / 48000:.1f} s audio"
        )
    finally:
        for r in (py_video, py_audio):
            if r is not None:
                await r.close()
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        await disconnect_all(py_room)
