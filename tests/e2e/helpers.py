"""Shared tools for Arbor's end-to-end tests with real LiveKit clients.

Everything here talks to a real `arbor` process (started by the `arbor` fixture in conftest.py)
through the official LiveKit Python SDK (`livekit.rtc`, the same Rust/libwebrtc core as the Rust and
Node SDKs) or through a raw WebSocket speaking the LiveKit signalling protobufs.

Media is synthetic but *verifiable*:

* Video frames carry a 16-bit number painted as a grid of large black and white cells (8 columns x
  4 rows). Rows 0-1 hold the 16 bits, rows 2-3 hold their complement. A receiver samples the centre
  of each cell; a frame whose bits and complement bits disagree is counted as unreadable instead of
  being trusted. Cells are 1/8 x 1/4 of the picture, so VP8 at any sane bitrate, and any simulcast
  layer down to 160x120, keeps them readable.
* Audio is a pure sine tone. A receiver checks the energy and that the spectral peak sits at the
  expected frequency, which silence, comfort noise or another participant's tone cannot fake.

Every wait in this module has a timeout and fails with a message that says what was awaited.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from datetime import timedelta
from typing import Any, Callable, Optional

import numpy as np
from livekit import api, rtc

log = logging.getLogger("arbor-e2e")

API_KEY = "devkey"
API_SECRET = "secret"

# ---------------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------------


def make_token(
    identity: str,
    room: str,
    *,
    name: Optional[str] = None,
    room_join: bool = True,
    can_publish: bool = True,
    can_subscribe: bool = True,
    can_publish_data: bool = True,
    ttl: timedelta = timedelta(hours=1),
    key: str = API_KEY,
    secret: str = API_SECRET,
) -> str:
    """A LiveKit access token made by the official `livekit-api` package (HS256 JWT)."""
    grants = api.VideoGrants(
        room_join=room_join,
        room=room,
        can_publish=can_publish,
        can_subscribe=can_subscribe,
        can_publish_data=can_publish_data,
    )
    return (
        api.AccessToken(key, secret)
        .with_identity(identity)
        .with_name(name or identity)
        .with_grants(grants)
        .with_ttl(ttl)
        .to_jwt()
    )


# ---------------------------------------------------------------------------------------------
# Waiting for things
# ---------------------------------------------------------------------------------------------


async def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
) -> Any:
    """Polls `predicate` until it returns a truthy value, or fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(interval)


@dataclasses.dataclass
class Event:
    """One room event as recorded by `EventLog`: when, which, and a summary of its arguments."""

    t: float
    name: str
    args: tuple


class EventLog:
    """Records the events a `rtc.Room` emits, so tests can wait for them and assert on them.

    Arguments are kept as the SDK objects (participants, publications, data packets); `describe()`
    gives a readable history for failure messages.
    """

    NAMES = (
        "participant_connected",
        "participant_disconnected",
        "track_published",
        "track_unpublished",
        "track_subscribed",
        "track_unsubscribed",
        "track_subscription_failed",
        "track_muted",
        "track_unmuted",
        "data_received",
        "disconnected",
        "reconnecting",
        "reconnected",
        "connection_state_changed",
        "local_track_published",
    )

    def __init__(self, room: rtc.Room, label: str) -> None:
        self.label = label
        self.events: list[Event] = []
        self._changed = asyncio.Event()
        for name in self.NAMES:
            room.on(name, self._recorder(name))

    def _recorder(self, name: str) -> Callable[..., None]:
        def record(*args: Any) -> None:
            self.events.append(Event(time.monotonic(), name, args))
            self._changed.set()

        return record

    def find(self, name: str, pred: Callable[..., bool] = lambda *a: True) -> list[Event]:
        return [e for e in self.events if e.name == name and pred(*e.args)]

    async def wait(
        self, name: str, pred: Callable[..., bool] = lambda *a: True, timeout: float = 20.0
    ) -> Event:
        """Waits for the first event called `name` whose arguments satisfy `pred`."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.find(name, pred)
            if found:
                return found[0]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"{self.label}: no '{name}' event matching within {timeout:.0f} s; "
                    f"events so far:\n{self.describe()}"
                )
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=min(remaining, 0.5))

    def describe(self) -> str:
        def fmt(a: Any) -> str:
            if isinstance(a, rtc.Participant):
                return f"participant({a.identity})"
            if isinstance(a, rtc.TrackPublication):
                return f"publication({a.sid},{a.kind},muted={a.muted})"
            if isinstance(a, rtc.DataPacket):
                who = a.participant.identity if a.participant else None
                return f"data({a.data[:40]!r},kind={a.kind},from={who},topic={a.topic})"
            return type(a).__name__
        t0 = self.events[0].t if self.events else 0.0
        return "\n".join(
            f"  +{e.t - t0:6.2f}s {e.name}({', '.join(fmt(a) for a in e.args)})"
            for e in self.events
        ) or "  (none)"


async def connect(
    url: str, token: str, label: str, *, auto_subscribe: bool = True, timeout: float = 30.0
) -> tuple[rtc.Room, EventLog]:
    """Connects a Python SDK participant; the event log is attached before `connect()`."""
    room = rtc.Room()
    events = EventLog(room, label)
    await asyncio.wait_for(
        room.connect(url, token, rtc.RoomOptions(auto_subscribe=auto_subscribe)), timeout
    )
    return room, events


async def disconnect_all(*rooms: Optional[rtc.Room]) -> None:
    """Disconnects rooms, never hanging: each disconnect is bounded."""
    for room in rooms:
        if room is None:
            continue
        with contextlib.suppress(Exception):
            await asyncio.wait_for(room.disconnect(), 10)


# ---------------------------------------------------------------------------------------------
# Video: a counter painted into the picture
# ---------------------------------------------------------------------------------------------

GRID_COLS = 8
GRID_ROWS = 4  # rows 0-1: bits 0..15, rows 2-3: the complement of the same bits


def counter_grid(value: int) -> np.ndarray:
    """The 4x8 grid of cell intensities (0 or 255) that encodes the 16-bit `value`."""
    bits = np.array([(value >> i) & 1 for i in range(16)], dtype=np.uint8)
    grid = np.concatenate([bits, 1 - bits]).reshape(GRID_ROWS, GRID_COLS)
    return grid * 255


def paint_counter(width: int, height: int, value: int) -> rtc.VideoFrame:
    """A RGBA frame of `width` x `height` showing `value` as the cell grid."""
    grid = counter_grid(value)
    ys = (np.arange(height) * GRID_ROWS) // height
    xs = (np.arange(width) * GRID_COLS) // width
    gray = grid[ys[:, None], xs[None, :]].astype(np.uint8)
    rgba = np.empty((height, width, 4), dtype=np.uint8)
    rgba[..., 0] = gray
    rgba[..., 1] = gray
    rgba[..., 2] = gray
    rgba[..., 3] = 255
    return rtc.VideoFrame(width, height, rtc.VideoBufferType.RGBA, rgba.tobytes())


def read_counter(frame: rtc.VideoFrame) -> Optional[int]:
    """Reads the counter back from a decoded frame, or `None` if the picture is not readable.

    Works on the luma plane, at whatever resolution the frame arrived in.
    """
    if frame.type != rtc.VideoBufferType.I420:
        frame = frame.convert(rtc.VideoBufferType.I420)
    w, h = frame.width, frame.height
    if w < GRID_COLS * 4 or h < GRID_ROWS * 4:
        return None
    luma = np.frombuffer(bytes(frame.data[: w * h]), dtype=np.uint8).reshape(h, w)
    bits = np.zeros(GRID_ROWS * GRID_COLS, dtype=np.int8)
    for row in range(GRID_ROWS):
        for col in range(GRID_COLS):
            y0, y1 = (row * h) // GRID_ROWS, ((row + 1) * h) // GRID_ROWS
            x0, x1 = (col * w) // GRID_COLS, ((col + 1) * w) // GRID_COLS
            cy, cx = (y1 - y0) // 4, (x1 - x0) // 4  # the central half of the cell
            mean = float(luma[y0 + cy : y1 - cy, x0 + cx : x1 - cx].mean())
            if 80 <= mean <= 176:
                return None  # neither black nor white: not a readable frame
            bits[row * GRID_COLS + col] = 1 if mean > 128 else 0
    value_bits, check_bits = bits[:16], bits[16:]
    if np.any(value_bits == check_bits):
        return None
    return int(sum(int(b) << i for i, b in enumerate(value_bits)))


class CounterVideoPublisher:
    """Publishes a synthetic camera track whose frames carry an increasing counter.

    `base` is added to every counter, so several publishers can be told apart by the receiver
    (the load test puts the publisher index in the top 4 bits).
    """

    def __init__(self, width: int, height: int, fps: int, *, base: int = 0) -> None:
        self.width, self.height, self.fps, self.base = width, height, fps, base
        self.source = rtc.VideoSource(width, height)
        self.track = rtc.LocalVideoTrack.create_video_track("camera", self.source)
        self.sent = 0  # number of frames captured so far; the last counter sent is base + sent - 1
        self._task: Optional[asyncio.Task] = None

    async def publish(self, room: rtc.Room, *, simulcast: bool = False) -> rtc.LocalTrackPublication:
        opts = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_CAMERA, simulcast=simulcast)
        pub = await asyncio.wait_for(room.local_participant.publish_track(self.track, opts), 30)
        self._task = asyncio.create_task(self._run())
        return pub

    async def _run(self) -> None:
        # Pre-render a small set of frames lazily: painting is cheap enough at these sizes.
        period = 1.0 / self.fps
        next_at = time.monotonic()
        while True:
            value = (self.base + self.sent) & 0xFFFF
            self.source.capture_frame(paint_counter(self.width, self.height, value))
            self.sent += 1
            next_at += period
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


@dataclasses.dataclass
class ReceivedFrame:
    t: float
    width: int
    height: int
    counter: Optional[int]


class VideoReceiver:
    """Reads every decoded frame of one remote video track and records its counter."""

    def __init__(self, track: rtc.Track, *, decode_every: int = 1) -> None:
        self.frames: list[ReceivedFrame] = []
        self._decode_every = decode_every
        self._stream = rtc.VideoStream(track, format=rtc.VideoBufferType.I420)
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        n = 0
        async for ev in self._stream:
            f = ev.frame
            counter = read_counter(f) if n % self._decode_every == 0 else None
            self.frames.append(ReceivedFrame(time.monotonic(), f.width, f.height, counter))
            n += 1

    def counters(self) -> list[int]:
        return [f.counter for f in self.frames if f.counter is not None]

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._stream.aclose(), 5)


# ---------------------------------------------------------------------------------------------
# Audio: a sine tone
# ---------------------------------------------------------------------------------------------

SAMPLE_RATE = 48000


class TonePublisher:
    """Publishes a 48 kHz mono microphone track playing a sine tone of `freq` Hz."""

    def __init__(self, freq: float, *, amplitude: float = 0.4, chunk_ms: int = 10) -> None:
        # Each `capture_frame` is an FFI round trip whose reply is matched against every FFI event
        # in flight; with many streams in one process, larger chunks keep the sender real-time.
        self.freq, self.amplitude, self.chunk_ms = freq, amplitude, chunk_ms
        self.source = rtc.AudioSource(SAMPLE_RATE, 1)
        self.track = rtc.LocalAudioTrack.create_audio_track("microphone", self.source)
        self.samples_sent = 0
        self._task: Optional[asyncio.Task] = None

    async def publish(self, room: rtc.Room) -> rtc.LocalTrackPublication:
        opts = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
        pub = await asyncio.wait_for(room.local_participant.publish_track(self.track, opts), 30)
        self._task = asyncio.create_task(self._run())
        return pub

    async def _run(self) -> None:
        chunk = SAMPLE_RATE * self.chunk_ms // 1000
        period = chunk / SAMPLE_RATE
        next_at = time.monotonic()
        while True:
            n = np.arange(self.samples_sent, self.samples_sent + chunk)
            pcm = (self.amplitude * 32767 * np.sin(2 * math.pi * self.freq * n / SAMPLE_RATE)).astype(
                np.int16
            )
            await self.source.capture_frame(rtc.AudioFrame(pcm.tobytes(), SAMPLE_RATE, 1, chunk))
            self.samples_sent += chunk
            next_at += period
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


class ToneReceiver:
    """Reads a remote audio track and counts 100 ms windows that carry the expected tone.

    A window counts as tone when its RMS is clearly above silence and its FFT peak is within
    `tolerance_hz` of `freq`.
    """

    WINDOW = SAMPLE_RATE // 10

    def __init__(
        self,
        track: rtc.Track,
        freq: float,
        *,
        tolerance_hz: float = 15.0,
        frame_size_ms: Optional[int] = None,
    ) -> None:
        self.freq, self.tolerance_hz = freq, tolerance_hz
        self.samples_received = 0
        self.tone_windows: list[float] = []  # arrival time of each window carrying the tone
        self.other_windows = 0
        self.loud_windows = 0  # windows with clear energy, whatever their frequency
        self.peaks: list[float] = []
        self._pending = np.zeros(0, dtype=np.int16)
        self._stream = rtc.AudioStream(
            track, sample_rate=SAMPLE_RATE, num_channels=1, frame_size_ms=frame_size_ms
        )
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for ev in self._stream:
            pcm = np.frombuffer(bytes(ev.frame.data), dtype=np.int16)
            self.samples_received += len(pcm)
            self._pending = np.concatenate([self._pending, pcm])
            while len(self._pending) >= self.WINDOW:
                window, self._pending = self._pending[: self.WINDOW], self._pending[self.WINDOW :]
                self._classify(window.astype(np.float64))

    def _classify(self, window: np.ndarray) -> None:
        rms = float(np.sqrt(np.mean(window**2)))
        spectrum = np.abs(np.fft.rfft(window * np.hanning(len(window))))
        peak_hz = float(np.argmax(spectrum[1:]) + 1) * SAMPLE_RATE / len(window)
        if rms > 500:
            self.loud_windows += 1
        if rms > 500 and abs(peak_hz - self.freq) <= self.tolerance_hz:
            self.tone_windows.append(time.monotonic())
        else:
            self.other_windows += 1
            if rms > 500:
                self.peaks.append(peak_hz)

    @property
    def tone_seconds(self) -> float:
        return len(self.tone_windows) * self.WINDOW / SAMPLE_RATE

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._stream.aclose(), 5)


# ---------------------------------------------------------------------------------------------
# Proving the server still serves a room
# ---------------------------------------------------------------------------------------------


async def assert_room_serves(url: str, room_name: str, publisher_identity: str, label: str) -> int:
    """Joins `room_name` as a fresh participant and requires decoded video from `publisher_identity`.

    Returns the number of readable frames seen. Used after abuse to show the server still works.
    """
    room, events = await connect(url, make_token(label, room_name), label)
    receiver: Optional[VideoReceiver] = None
    try:
        ev = await events.wait(
            "track_subscribed",
            lambda track, pub, p: p.identity == publisher_identity and track.kind == rtc.TrackKind.KIND_VIDEO,
            timeout=30,
        )
        receiver = VideoReceiver(ev.args[0])
        await wait_until(
            lambda: len(receiver.counters()) >= 15, 30, f"{label}: 15 readable frames from {publisher_identity}"
        )
        return len(receiver.counters())
    finally:
        if receiver:
            await receiver.close()
        await disconnect_all(room)


# ---------------------------------------------------------------------------------------------
# Server metrics
# ---------------------------------------------------------------------------------------------


def server_metrics(server) -> dict:
    """The server's Prometheus samples (`GET /metrics`), name (with labels) -> value."""
    import urllib.request

    out = {}
    with urllib.request.urlopen(server.http_url + "/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                try:
                    out[name] = float(value)
                except ValueError:
                    pass
    return out
