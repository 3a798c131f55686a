"""Issue 2, acceptance item 4: six participants, each publishing audio and video to all the others.

Each participant runs in its own process (clients/load_participant.py), like six real clients.
Participant i publishes 320x240@15 video whose counter carries i in its top 4 bits, and a tone of
300 + 100*i Hz, and subscribes to everyone else: 30 video and 30 audio subscriptions. After a
30 s run every subscription must have delivered the right publisher's media, still flowing in the
last 10 s (a wrongly routed stream shows the wrong index or the wrong tone and does not count).
The `arbor` process is sampled meanwhile: average CPU (utime+stime from /proc/PID/stat) and peak
RSS (VmRSS samples and VmHWM from /proc/PID/status) are printed and appended to the results file.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

import pytest

from helpers import make_token

HERE = Path(__file__).resolve().parent
ROOM = "load-room"
N = 6
RUN_SECONDS = 30
LAST_WINDOW = 10


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


async def read_line(proc, prefix: str, timeout: float, what: str) -> str:
    """The next stdout line of `proc` starting with `prefix` (other lines are skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        raw = await asyncio.wait_for(proc.stdout.readline(), remaining)
        if not raw:
            raise AssertionError(f"{what}: client exited ({await proc.wait()}) before {prefix}")
        line = raw.decode(errors="replace").strip()
        if line.startswith(prefix):
            return line
        if line.startswith("NOT-READY"):
            raise AssertionError(f"{what}: {line}")


@pytest.mark.timeout(300)
async def test_six_participants_all_subscriptions_flow(arbor, results):
    procs = []
    try:
        for i in range(N):
            log = open(arbor.log_path.with_suffix(f".p{i}.log"), "wb")
            procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    str(HERE / "clients" / "load_participant.py"),
                    "--url", arbor.ws_url,
                    "--token", make_token(f"p-{i}", ROOM),
                    "--index", str(i),
                    "--peers", str(N - 1),
                    "--last", str(LAST_WINDOW),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=log,
                )
            )
            log.close()
        for i, p in enumerate(procs):
            await read_line(p, "READY", 150, f"p-{i} receiving all {N - 1} peers' video and audio")

        # --- the measured run --------------------------------------------------------------
        for p in procs:
            p.stdin.write(f"RUN {RUN_SECONDS}\n".encode())
            await p.stdin.drain()
        pid = arbor.pid
        cpu0, t0 = proc_cpu_seconds(pid), time.monotonic()
        peak_rss = 0
        while time.monotonic() - t0 < RUN_SECONDS:
            peak_rss = max(peak_rss, proc_status_kib(pid, "VmRSS"))
            await asyncio.sleep(1.0)
        cpu1, t1 = proc_cpu_seconds(pid), time.monotonic()
        peak_rss = max(peak_rss, proc_status_kib(pid, "VmRSS"), proc_status_kib(pid, "VmHWM"))
        cpu_pct = 100.0 * (cpu1 - cpu0) / (t1 - t0)
        stats = [
            json.loads((await read_line(p, "STATS ", 60, f"p-{i} stats"))[len("STATS ") :])
            for i, p in enumerate(procs)
        ]

        problems, lines = [], []
        for st in stats:
            i = st["index"]
            lines.append(
                f"p-{i} sent {st['sent_fps']:.1f} fps video, {st['sent_audio_ratio']:.2f} s audio per s"
            )
            # The clients themselves must keep up, or a stall would not be the server's doing.
            if st["sent_fps"] < 10 or st["sent_audio_ratio"] < 0.9:
                problems.append(f"test client p-{i} could not send in real time (machine overloaded?): {lines[-1]}")
            for j in range(N):
                if j == i:
                    continue
                s = st["from"].get(str(j))
                if s is None:
                    problems.append(f"p-{i} has no subscription to p-{j}")
                    continue
                lines.append(
                    f"  p-{i} <- p-{j}: video {s['frames']} frames ({s['recent_frames']} in last "
                    f"{LAST_WINDOW} s, {s['readable']} read), tone {s['tone_seconds']:.1f} s "
                    f"({s['recent_tone_seconds']:.1f} s recent) of {s['audio_received_seconds']:.1f} s "
                    f"audio, other peaks {s['other_peaks']}"
                )
                if s["wrong_publisher"]:
                    problems.append(f"p-{i} got p-{j}'s video with wrong counters {s['wrong_publisher']}")
                if s["readable"] < 10:
                    problems.append(f"p-{i} <- p-{j}: only {s['readable']} readable video frames")
                if s["recent_frames"] < 5 * LAST_WINDOW:  # 15 fps sent; demand a third
                    problems.append(
                        f"p-{i} <- p-{j}: video stalled, {s['recent_frames']} frames in the last {LAST_WINDOW} s"
                    )
                if s["recent_tone_seconds"] < 0.5 * LAST_WINDOW:
                    problems.append(
                        f"p-{i} <- p-{j}: audio stalled, {s['recent_tone_seconds']:.1f} s of p-{j}'s tone "
                        f"in the last {LAST_WINDOW} s"
                    )
        print("\n".join(lines))
        results(
            f"load: {N} participants (one process each), {N * (N - 1)} video + {N * (N - 1)} audio "
            f"subscriptions, {RUN_SECONDS} s: arbor avg CPU {cpu_pct:.1f}% of one core, "
            f"peak RSS {peak_rss / 1024:.1f} MiB"
        )
        assert not problems, "\n".join(problems)
    finally:
        for p in procs:
            if p.returncode is None:
                try:
                    p.stdin.write(b"QUIT\n")
                    p.stdin.close()
                except Exception:
                    pass
        for p in procs:
            try:
                await asyncio.wait_for(p.wait(), 20)
            except asyncio.TimeoutError:
                p.kill()
                await p.wait()
