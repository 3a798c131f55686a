"""Tools for the media-quality tests (test_quality.py): a browser publisher, subscriber processes,
and a camera picture every receiver can check.

* `write_counter_y4m` writes a Y4M clip whose frames carry the counter grid of helpers.py plus
  per-frame noise. Chromium plays it as its fake camera (`--use-file-for-fake-video-capture`), so
  each decoded frame of any simulcast layer can be checked (helpers.read_counter) and the noise
  makes every layer use its full bitrate, as a real camera would (a flat test pattern would fit
  all three layers into a few hundred kbit/s and no bandwidth limit would ever bite).
* `Browser` runs js/quality_drive.mjs (livekit-client 2.23 in Debian Chromium) and sends it
  commands.
* `SubProc` runs clients/quality_sub.py (the Python SDK), optionally inside a `netns.ChildNet`,
  and keeps every report it prints.

Every wait is bounded and fails with a message that says what was awaited.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from helpers import counter_grid, GRID_COLS, GRID_ROWS

HERE = Path(__file__).resolve().parent
JS = HERE / "js"


# ---------------------------------------------------------------------------------------------
# The camera picture
# ---------------------------------------------------------------------------------------------


def write_counter_y4m(
    path: Path, width: int, height: int, frames: int, fps: int, *, noise: int = 48, seed: int = 4
) -> Path:
    """Writes a 4:2:0 Y4M clip: frame i shows counter i as the black/white cell grid, with
    uniform noise of +-`noise` on the luma (seeded, so the clip is the same on every run).

    Skips the work when a file with the same parameters exists already.
    """
    stamp = f"{width}x{height} {frames} {fps} {noise} {seed}"
    tag = path.with_suffix(".params")
    if path.is_file() and tag.is_file() and tag.read_text() == stamp:
        return path
    rng = np.random.default_rng(seed)
    ys = (np.arange(height) * GRID_ROWS) // height
    xs = (np.arange(width) * GRID_COLS) // width
    chroma = np.full((height // 2) * (width // 2) * 2, 128, dtype=np.uint8).tobytes()
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for i in range(frames):
            grid = counter_grid(i)
            # Full-range cells (16 = black, 235 = white in video range) plus noise.
            luma = np.where(grid[ys[:, None], xs[None, :]] > 0, 225, 30).astype(np.int16)
            luma += rng.integers(-noise, noise + 1, size=luma.shape, dtype=np.int16)
            f.write(b"FRAME\n")
            f.write(np.clip(luma, 0, 255).astype(np.uint8).tobytes())
            f.write(chroma)
    os.replace(tmp, path)
    tag.write_text(stamp)
    return path


# ---------------------------------------------------------------------------------------------
# A line-protocol child process
# ---------------------------------------------------------------------------------------------


async def _pump_stderr(proc: asyncio.subprocess.Process, label: str, sink: list[str]) -> None:
    assert proc.stderr is not None
    async for raw in proc.stderr:
        line = raw.decode(errors="replace").rstrip()
        sink.append(line)
        if len(sink) > 400:
            del sink[:100]
        print(f"[{label}] {line}")


async def _kill(proc: Optional[asyncio.subprocess.Process]) -> None:
    if proc is None or proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(proc.wait(), 10)


# ---------------------------------------------------------------------------------------------
# Browser
# ---------------------------------------------------------------------------------------------


class Browser:
    """livekit-client in headless Chromium, driven through js/quality_drive.mjs."""

    def __init__(self) -> None:
        self.proc: Optional[asyncio.subprocess.Process] = None
        self.stderr: list[str] = []
        self._seq = 0
        self._tasks: list[asyncio.Task] = []

    async def start(self, *, video_file: Optional[Path] = None, hard_limit: int = 300) -> "Browser":
        cfg = {"hardLimitSeconds": hard_limit}
        if video_file:
            cfg["videoFile"] = str(video_file)
        self.proc = await asyncio.create_subprocess_exec(
            "node", str(JS / "quality_drive.mjs"), json.dumps(cfg),
            cwd=str(JS),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=1 << 22,
        )
        self._tasks.append(asyncio.create_task(_pump_stderr(self.proc, "browser", self.stderr)))
        ready = await self._read_reply(0, 60)
        if ready.get("error"):
            raise AssertionError(f"browser did not start: {ready['error']}")
        return self

    async def _read_reply(self, seq: int, timeout: float) -> dict:
        assert self.proc and self.proc.stdout
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"browser: no reply to command {seq} within {timeout:.0f} s")
            raw = await asyncio.wait_for(self.proc.stdout.readline(), remaining)
            if not raw:
                raise AssertionError(
                    f"browser driver exited (waiting for reply {seq}); stderr tail:\n"
                    + "\n".join(self.stderr[-30:])
                )
            line = raw.decode(errors="replace").strip()
            if not line.startswith("REPLY "):
                continue
            msg = json.loads(line[len("REPLY "):])
            if msg.get("seq") == seq:
                return msg

    async def call(self, cmd: str, timeout: float = 60, **kw: Any) -> dict:
        assert self.proc and self.proc.stdin
        self._seq += 1
        seq = self._seq
        self.proc.stdin.write((json.dumps({"seq": seq, "cmd": cmd, **kw}) + "\n").encode())
        await self.proc.stdin.drain()
        msg = await self._read_reply(seq, timeout)
        if msg.get("error"):
            raise AssertionError(f"browser command {cmd} failed: {msg['error']}")
        return msg

    async def open(self, page: str, page_base: str, **query: Any) -> dict:
        from urllib.parse import urlencode

        url = f"{page_base}?{urlencode({k: str(v) for k, v in query.items()})}"
        return (await self.call("open", timeout=75, page=page, url=url, timeoutMs=60000))["state"]

    async def state(self, page: str) -> dict:
        return (await self.call("state", page=page))["state"]

    async def sender(self, page: str) -> dict:
        return (await self.call("sender", page=page))["sender"]

    async def video(self, page: str) -> dict:
        return (await self.call("video", page=page))["video"]

    async def set_dimensions(self, page: str, width: int, height: int) -> int:
        return (await self.call("dims", page=page, width=width, height=height))["n"]

    async def set_fps(self, page: str, fps: int) -> int:
        """`setVideoFPS(fps)` on every remote video publication of the page."""
        return (await self.call("fps", page=page, fps=fps))["n"]

    async def layer_rates(self, page: str, seconds: float = 2.0) -> dict:
        """Per simulcast layer over `seconds`: sent kbit/s, encoded frames/s, size, sender
        `active` flag (from getParameters) and Chromium's quality limitation reason."""
        a = await self.sender(page)
        await asyncio.sleep(seconds)
        b = await self.sender(page)
        dt = max(0.001, (b["t"] - a["t"]) / 1000)
        active = {e.get("rid") or "-": e.get("active", True) for e in b["encodings"]}
        out = {}
        for rid, lb in b["layers"].items():
            la = a["layers"].get(rid, {"bytesSent": 0, "framesEncoded": 0})
            out[rid] = {
                "kbps": round((lb["bytesSent"] - la["bytesSent"]) * 8 / dt / 1000, 1),
                "fps": round((lb["framesEncoded"] - la["framesEncoded"]) / dt, 1),
                "size": f"{lb['frameWidth']}x{lb['frameHeight']}",
                "active": active.get(rid),
                "limit": lb.get("qualityLimitationReason"),
                # Cumulative counters: what the server asked of this layer so far.
                "nacks": lb.get("nackCount"),
                "plis": lb.get("pliCount"),
                "keyframes": lb.get("keyFramesEncoded"),
                "rtx": lb.get("retransmittedPacketsSent"),
            }
        return out

    async def close(self) -> None:
        if self.proc and self.proc.returncode is None:
            with contextlib.suppress(Exception):
                await self.call("quit", timeout=15)
        await _kill(self.proc)
        for t in self._tasks:
            t.cancel()


# ---------------------------------------------------------------------------------------------
# Python SDK subscriber processes
# ---------------------------------------------------------------------------------------------


class SubProc:
    """A clients/quality_sub.py process and everything it reported."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.proc: Optional[asyncio.subprocess.Process] = None
        self.stats: list[dict] = []
        self.qualities: list[dict] = []
        self.speakers: list[dict] = []
        self.events: list[dict] = []
        self.stderr: list[str] = []
        self._tasks: list[asyncio.Task] = []

    async def start(
        self,
        url: str,
        token: str,
        publisher: str,
        *,
        wrap: Callable[[list[str]], list[str]] = lambda a: a,
        initial_quality: Optional[str] = None,
        max_seconds: float = 240,
        dump_dir: Optional[Path] = None,
    ) -> "SubProc":
        argv = [
            sys.executable, str(HERE / "clients" / "quality_sub.py"),
            "--url", url, "--token", token, "--publisher", publisher,
            "--max-seconds", str(max_seconds),
        ]
        if initial_quality:
            argv += ["--initial-quality", initial_quality]
        if dump_dir:
            argv += ["--dump-dir", str(dump_dir)]
        argv = wrap(argv)
        self.proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=1 << 22,
        )
        self._tasks.append(asyncio.create_task(self._read()))
        self._tasks.append(asyncio.create_task(_pump_stderr(self.proc, self.label, self.stderr)))
        return self

    async def _read(self) -> None:
        assert self.proc and self.proc.stdout
        async for raw in self.proc.stdout:
            try:
                msg = json.loads(raw)
            except ValueError:
                continue
            ev = msg.get("ev")
            if ev == "stat":
                self.stats.append(msg)
            elif ev == "quality":
                self.qualities.append(msg)
            elif ev == "speakers":
                self.speakers.append(msg)
            else:
                self.events.append(msg)

    async def send(self, **cmd: Any) -> None:
        assert self.proc and self.proc.stdin
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        await self.proc.stdin.drain()

    async def set_quality(self, value: str) -> None:
        await self.send(cmd="quality", value=value)

    def unreadable(self) -> list[dict]:
        return [e for e in self.events if e.get("ev") == "unreadable"]

    @property
    def last(self) -> dict:
        return self.stats[-1] if self.stats else {}

    def frames_since(self, t: float) -> list[dict]:
        return [s for s in self.stats if s["t"] >= t]

    def describe(self, n: int = 12) -> str:
        rows = []
        for s in self.stats[-n:]:
            ib = s.get("inbound") or {}
            rows.append(
                f"  frames={s['frames']} readable={s['readable']} unreadable={s['unreadable']} "
                f"last={s['w']}x{s['h']} period={s['sizes']} decoded={ib.get('frames_decoded')} "
                f"nack={ib.get('nack_count')} pli={ib.get('pli_count')} lost={ib.get('packets_lost')}"
            )
        return f"{self.label}: last {len(rows)} reports:\n" + "\n".join(rows) + (
            f"\n  unreadable={self.unreadable()[:10]}"
            f"\n  events={[e for e in self.events if e.get('ev') != 'unreadable'][-5:]} qualities={self.qualities[-5:]}"
            f"\n  stderr tail: {self.stderr[-5:]}"
        )

    async def wait(self, predicate: Callable[["SubProc"], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            v = predicate(self)
            if v:
                return v
            if self.proc and self.proc.returncode is not None:
                raise AssertionError(f"{self.label} exited ({self.proc.returncode}) while waiting for {what}\n{self.describe()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.label}: timed out after {timeout:.0f} s waiting for {what}\n{self.describe()}")
            await asyncio.sleep(0.1)

    async def wait_size(self, w: int, h: int, timeout: float, *, periods: int = 2) -> float:
        """Waits until the last `periods` reports saw frames, all at `w`x`h`; returns when the
        first of them was reported."""
        key = f"{w}x{h}"

        def ok(sp: "SubProc") -> Optional[float]:
            tail = sp.stats[-periods:]
            if len(tail) == periods and all(s["sizes"] and set(s["sizes"]) == {key} for s in tail):
                return tail[0]["t"]
            return None

        return await self.wait(ok, timeout, f"frames at {key}")

    async def close(self) -> None:
        if self.proc and self.proc.returncode is None:
            with contextlib.suppress(Exception):
                await self.send(cmd="quit")
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.proc.wait(), 15)
        await _kill(self.proc)
        for t in self._tasks:
            t.cancel()
