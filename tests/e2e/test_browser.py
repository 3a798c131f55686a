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

from helpers import VideoReceiver, connect, disconnect_all, make_token, wait_until

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
    proc = None
    try:
        py_room, py_events = await connect(arbor.ws_url, make_token("py-sub", ROOM), "py-sub")
        cfg = {
            "pageBase": page_server,
            "wsUrl": arbor.ws_url,
            "pubToken": make_token("browser-pub", ROOM),
            "subToken": make_token("browser-sub", ROOM),
            "watchSeconds": 10,
            "hardLimitSeconds": 180,
        }
        proc = await asyncio.create_subprocess_exec(
            "node",
            str(JS / "drive.mjs"),
            json.dumps(cfg),
            cwd=str(JS),
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

        # Python subscriber: decode the browser's camera while the driver runs.
        ev = await py_events.wait(
            "track_subscribed",
            lambda t, pub, p: p.identity == "browser-pub" and t.kind == rtc.TrackKind.KIND_VIDEO,
            timeout=90,
        )
        py_video = VideoReceiver(ev.args[0], decode_every=1_000_000)  # frames, not counters
        await wait_until(lambda: len(py_video.frames) >= 60, 60, "60 decoded browser frames at py-sub")
        py_sizes = sorted({(f.width, f.height) for f in py_video.frames})
        print(f"py-sub decoded {len(py_video.frames)} frames, sizes {py_sizes}")
        assert all(w > 0 and h > 0 for w, h in py_sizes)

        stdout = await asyncio.wait_for(proc.stdout.read(), 200)
        await asyncio.wait_for(proc.wait(), 30)
        await asyncio.wait_for(stderr_task, 10)
        result_lines = [l for l in stdout.decode().splitlines() if l.startswith("RESULT ")]
        assert result_lines, f"drive.mjs printed no RESULT; exit {proc.returncode}"
        result = json.loads(result_lines[-1][len("RESULT ") :])
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
        # The fake camera runs at 30 fps; demand a third of that to stay clear of CPU hiccups.
        assert grown >= 10 * seconds, f"framesDecoded grew by only {grown} in {seconds:.1f} s: {decoded}"
        results(
            f"browser: publisher connect {pub['connectMs']:.0f} ms, subscriber connect "
            f"{sub['connectMs']:.0f} ms, subscriber decoded {grown} frames in {seconds:.1f} s "
            f"at {samples[-1]['videoWidth']}x{samples[-1]['videoHeight']}; "
            f"py-sub decoded {len(py_video.frames)} frames"
        )
    finally:
        if py_video is not None:
            await py_video.close()
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        await disconnect_all(py_room)
