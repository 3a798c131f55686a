"""Issue 2, acceptance item 4: six participants, each publishing audio and video to all the others.

Each participant i publishes 320x240@15 video whose counter carries i in its top 4 bits, and a tone
of 300 + 100*i Hz, and subscribes to everyone else: 30 video and 30 audio subscriptions. After a
30 s run every subscription must have delivered the right publisher's media, still flowing in the
last 10 s (a wrongly routed stream shows the wrong index or the wrong tone and does not count).
The `arbor` process is sampled meanwhile: average CPU (utime+stime from /proc/PID/stat) and peak
RSS (VmRSS / VmHWM from /proc/PID/status) are printed and appended to the results file.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from livekit import rtc

from helpers import (
    CounterVideoPublisher,
    ToneReceiver,
    TonePublisher,
    VideoReceiver,
    connect,
    disconnect_all,
    make_token,
    wait_until,
)

ROOM = "load-room"
N = 6
RUN_SECONDS = 30
LAST_WINDOW = 10


def tone_of(i: int) -> float:
    return 300.0 + 100.0 * i


def proc_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def proc_status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


@pytest.mark.timeout(300)
async def test_six_participants_all_subscriptions_flow(arbor, results):
    rooms: list[rtc.Room] = []
    publishers: list = []
    video_rx: dict[tuple[int, int], VideoReceiver] = {}
    audio_rx: dict[tuple[int, int], ToneReceiver] = {}
    try:
        for i in range(N):
            room = rtc.Room()

            def on_subscribed(track, pub, participant, i=i):
                j = int(participant.identity.split("-")[1])
                if track.kind == rtc.TrackKind.KIND_VIDEO and (i, j) not in video_rx:
                    video_rx[(i, j)] = VideoReceiver(track, decode_every=3)
                elif track.kind == rtc.TrackKind.KIND_AUDIO and (i, j) not in audio_rx:
                    audio_rx[(i, j)] = ToneReceiver(track, tone_of(j), frame_size_ms=50)

            room.on("track_subscribed", on_subscribed)
            await asyncio.wait_for(room.connect(arbor.ws_url, make_token(f"p-{i}", ROOM)), 30)
            rooms.append(room)
            video = CounterVideoPublisher(320, 240, 15, base=i << 12)
            audio = TonePublisher(tone_of(i))
            await video.publish(room)
            await audio.publish(room)
            publishers += [video, audio]

        expected = {(i, j) for i in range(N) for j in range(N) if i != j}
        await wait_until(
            lambda: set(video_rx) >= expected and set(audio_rx) >= expected,
            90,
            f"all {len(expected)} video and audio subscriptions "
            f"(have video {len(video_rx)}, audio {len(audio_rx)})",
        )
        assert set(video_rx) == expected, f"unexpected video subscriptions {set(video_rx) - expected}"

        # --- the measured run --------------------------------------------------------------
        pid = arbor.pid
        cpu0, t0 = proc_cpu_seconds(pid), time.monotonic()
        peak_rss = 0
        while time.monotonic() - t0 < RUN_SECONDS:
            peak_rss = max(peak_rss, proc_status_kib(pid, "VmRSS"))
            await asyncio.sleep(1.0)
        cpu1, t1 = proc_cpu_seconds(pid), time.monotonic()
        peak_rss = max(peak_rss, proc_status_kib(pid, "VmRSS"), proc_status_kib(pid, "VmHWM"))
        cpu_pct = 100.0 * (cpu1 - cpu0) / (t1 - t0)
        last_from = t1 - LAST_WINDOW

        problems = []
        lines = []
        for (i, j) in sorted(expected):
            v = video_rx[(i, j)]
            readable = [f for f in v.frames if f.counter is not None]
            wrong = [f.counter for f in readable if f.counter >> 12 != j]
            recent = [f for f in v.frames if f.t >= last_from]
            a = audio_rx[(i, j)]
            recent_tone = [t for t in a.tone_windows if t >= last_from]
            lines.append(
                f"p-{i} <- p-{j}: video {len(v.frames)} frames ({len(recent)} in last {LAST_WINDOW} s, "
                f"{len(readable)} read), audio tone {a.tone_seconds:.1f} s ({len(recent_tone) / 10:.1f} s recent)"
            )
            if wrong:
                problems.append(f"p-{i} got video from the wrong publisher via p-{j}: {wrong[:5]}")
            if len(readable) < 10:
                problems.append(f"p-{i} <- p-{j}: only {len(readable)} readable video frames")
            if len(recent) < 2 * LAST_WINDOW:
                problems.append(f"p-{i} <- p-{j}: video stalled, {len(recent)} frames in the last {LAST_WINDOW} s")
            if len(recent_tone) < 10:
                problems.append(
                    f"p-{i} <- p-{j}: audio stalled, {len(recent_tone) / 10:.1f} s of the {tone_of(j):.0f} Hz "
                    f"tone in the last {LAST_WINDOW} s (other windows {a.other_windows}, peaks {a.peaks[-5:]})"
                )
        print("\n".join(lines))
        results(
            f"load: {N} participants, {len(expected)} video + {len(expected)} audio subscriptions, "
            f"{RUN_SECONDS} s: arbor avg CPU {cpu_pct:.1f}% of one core, peak RSS {peak_rss / 1024:.1f} MiB"
        )
        assert not problems, "\n".join(problems)
    finally:
        for r in list(video_rx.values()) + list(audio_rx.values()):
            await r.close()
        for p in publishers:
            await p.stop()
        await disconnect_all(*rooms)
