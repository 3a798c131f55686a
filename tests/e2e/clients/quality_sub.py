"""A Python SDK subscriber for the media-quality tests (test_quality.py), one process per client.

It runs as its own process so that it can live in a child network namespace (`netns.ChildNet`)
whose link the test shapes with `tc netem`. It joins, subscribes to the video of `--publisher`,
decodes every frame and reads the counter painted into it (helpers.read_counter), and speaks JSON
lines with the test:

    stdout  {"ev": "subscribed", "sid": ..., "simulcasted": bool}
    stdout  {"ev": "stat", "t": ..., "frames": n, "readable": n, "unreadable": n, "w": .., "h": ..,
             "sizes": {"WxH": frames in this period}, "inbound": {...webrtc inbound-rtp...}}
             every `--every` seconds (w/h: the last frame; sizes: frames since the last report)
    stdout  {"ev": "quality", "identity": ..., "quality": "EXCELLENT"|"GOOD"|"POOR"|"LOST"}
    stdout  {"ev": "speakers", "identities": [...]}
    stdin   {"cmd": "quality", "value": "low"|"medium"|"high"}  -> set_video_quality
    stdin   {"cmd": "quit"}  (or end of input)                 -> leave and exit

Bounded: leaves after `--max-seconds` whatever happens.
"""

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from typing import Optional

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from livekit import rtc  # noqa: E402

from helpers import disconnect_all, read_counter  # noqa: E402

QUALITIES = {
    "low": rtc.VideoQuality.VIDEO_QUALITY_LOW,
    "medium": rtc.VideoQuality.VIDEO_QUALITY_MEDIUM,
    "high": rtc.VideoQuality.VIDEO_QUALITY_HIGH,
}
QUALITY_NAMES = {
    rtc.ConnectionQuality.QUALITY_EXCELLENT: "EXCELLENT",
    rtc.ConnectionQuality.QUALITY_GOOD: "GOOD",
    rtc.ConnectionQuality.QUALITY_POOR: "POOR",
    rtc.ConnectionQuality.QUALITY_LOST: "LOST",
}
INBOUND_FIELDS = (
    "frames_decoded", "key_frames_decoded", "frames_dropped", "frame_width", "frame_height",
    "freeze_count", "nack_count", "pli_count", "fir_count", "retransmitted_packets_received",
    "bytes_received",
)


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def inbound_stats(track: rtc.Track) -> dict:
    out: dict = {}
    for s in await asyncio.wait_for(track.get_stats(), 5):
        if s.WhichOneof("stats") != "inbound_rtp":
            continue
        ib = s.inbound_rtp
        if ib.stream.kind != "video":
            continue
        for f in INBOUND_FIELDS:
            out[f] = getattr(ib.inbound, f)
        out["packets_lost"] = ib.received.packets_lost
        out["packets_received"] = ib.received.packets_received
    return out


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--publisher", required=True, help="identity whose video to read")
    ap.add_argument("--every", type=float, default=0.5)
    ap.add_argument("--max-seconds", type=float, default=240.0)
    ap.add_argument("--initial-quality", choices=sorted(QUALITIES), default=None)
    ap.add_argument("--dump-dir", default=None, help="write the first unreadable frames here (.pgm)")
    args = ap.parse_args()
    started = time.monotonic()
    loop = asyncio.get_running_loop()

    room = rtc.Room()
    pub_holder: dict = {}
    frames: dict = {"n": 0, "readable": 0, "unreadable": 0, "w": 0, "h": 0, "sizes": Counter()}

    recent: list = []  # the last few (index, size, counter, timestamp ms), for reports

    async def read_video(track: rtc.Track) -> None:
        stream = rtc.VideoStream(track, format=rtc.VideoBufferType.I420)
        async for ev in stream:
            f = ev.frame
            frames["n"] += 1
            if (f.width, f.height) != (frames["w"], frames["h"]):
                frames["switch_at"], frames["prev_size"] = frames["n"], f"{frames['w']}x{frames['h']}"
            frames["w"], frames["h"] = f.width, f.height
            frames["sizes"][f"{f.width}x{f.height}"] += 1
            value = read_counter(f)
            recent.append((frames["n"], f"{f.width}x{f.height}", value, ev.timestamp_us // 1000))
            del recent[:-6]
            if value is None:
                frames["unreadable"] += 1
                emit({"ev": "unreadable", "t": time.monotonic(), "index": frames["n"], "size": f"{f.width}x{f.height}",
                      "after": frames.get("last_value"), "prev_size": frames.get("prev_size"),
                      "frames_since_size_change": frames["n"] - frames.get("switch_at", 0),
                      "recent": list(recent)})
                if args.dump_dir and frames["unreadable"] <= 5:
                    path = os.path.join(args.dump_dir, f"unreadable-{os.getpid()}-{frames['n']}.pgm")
                    with open(path, "wb") as out:
                        out.write(f"P5 {f.width} {f.height} 255\n".encode())
                        out.write(bytes(f.data[: f.width * f.height]))
            else:
                frames["readable"] += 1
                frames["last_value"] = value

    def on_subscribed(track, pub, participant):
        if participant.identity != args.publisher or track.kind != rtc.TrackKind.KIND_VIDEO:
            return
        if "track" in pub_holder:
            return
        pub_holder["track"], pub_holder["pub"] = track, pub
        if args.initial_quality:
            pub.set_video_quality(QUALITIES[args.initial_quality])
        pub_holder["task"] = asyncio.ensure_future(read_video(track))
        emit({"ev": "subscribed", "sid": pub.sid, "simulcasted": pub.simulcasted})

    def on_quality(participant, quality):
        emit({
            "ev": "quality",
            "t": time.monotonic(),
            "identity": participant.identity if participant else None,
            "quality": QUALITY_NAMES.get(quality, str(int(quality))),
        })

    def on_speakers(speakers):
        emit({"ev": "speakers", "t": time.monotonic(), "identities": [p.identity for p in speakers]})

    room.on("track_subscribed", on_subscribed)
    room.on("connection_quality_changed", on_quality)
    room.on("active_speakers_changed", on_speakers)
    await asyncio.wait_for(room.connect(args.url, args.token), 30)
    emit({"ev": "connected", "identity": room.local_participant.identity})

    quit_event = asyncio.Event()

    async def commands() -> None:
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while True:
            line = await reader.readline()
            if not line:
                break
            try:
                cmd = json.loads(line)
            except ValueError:
                continue
            if cmd.get("cmd") == "quit":
                break
            if cmd.get("cmd") == "quality" and "pub" in pub_holder:
                pub_holder["pub"].set_video_quality(QUALITIES[cmd["value"]])
                emit({"ev": "ack", "cmd": cmd})
        quit_event.set()

    async def reports() -> None:
        while True:
            await asyncio.sleep(args.every)
            inbound: Optional[dict] = None
            if "track" in pub_holder:
                try:
                    inbound = await inbound_stats(pub_holder["track"])
                except Exception as e:  # stats are best effort; frames are the real signal
                    inbound = {"error": str(e)}
            emit({
                "ev": "stat",
                "t": time.monotonic(),
                "frames": frames["n"],
                "readable": frames["readable"],
                "unreadable": frames["unreadable"],
                "w": frames["w"],
                "h": frames["h"],
                "sizes": dict(frames["sizes"]),
                "inbound": inbound,
            })
            frames["sizes"].clear()

    tasks = [asyncio.ensure_future(commands()), asyncio.ensure_future(reports())]
    remaining = args.max_seconds - (time.monotonic() - started)
    try:
        await asyncio.wait_for(quit_event.wait(), max(1.0, remaining))
    except asyncio.TimeoutError:
        emit({"ev": "timeout"})
    for t in tasks + ([pub_holder["task"]] if "task" in pub_holder else []):
        t.cancel()
    await disconnect_all(room)
    return 0


if __name__ == "__main__":
    code = asyncio.run(main())
    sys.stdout.flush()
    # The SDK's native runtime may abort during interpreter teardown; the exit status is ours.
    os._exit(code)
