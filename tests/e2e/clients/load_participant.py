"""One participant of the load test (test_load.py), in its own process like a real client.

It joins, publishes 320x240@15 counter video (its index in the top 4 bits) and a tone of
300 + 100*index Hz, subscribes to everyone, and speaks a line protocol with the test:

    stdout  READY                    once it receives video and audio from all `--peers` others
    stdin   RUN <seconds>            start the measured run
    stdout  STATS <json>             per publisher: frames, readable frames, wrong-publisher frames,
                                     frames and tone seconds within the last `--last` seconds
    stdin   QUIT  (or end of input)  leave and exit

Bounded: it gives up (exit 3) if not ready within `--ready-timeout` seconds, and leaves after at
most `--max-seconds` in total whatever it is told.
"""

import argparse
import asyncio
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from livekit import rtc  # noqa: E402

from helpers import (  # noqa: E402
    CounterVideoPublisher,
    ToneReceiver,
    TonePublisher,
    VideoReceiver,
    disconnect_all,
)


def tone_of(i: int) -> float:
    return 300.0 + 100.0 * i


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--index", type=int, required=True)
    ap.add_argument("--peers", type=int, required=True)
    ap.add_argument("--last", type=float, default=10.0)
    ap.add_argument("--ready-timeout", type=float, default=120.0)
    ap.add_argument("--max-seconds", type=float, default=240.0)
    args = ap.parse_args()
    started = time.monotonic()
    loop = asyncio.get_running_loop()

    video_rx: dict[int, VideoReceiver] = {}
    audio_rx: dict[int, ToneReceiver] = {}
    room = rtc.Room()

    def on_subscribed(track, pub, participant):
        j = int(participant.identity.split("-")[1])
        if track.kind == rtc.TrackKind.KIND_VIDEO and j not in video_rx:
            video_rx[j] = VideoReceiver(track, decode_every=3)
        elif track.kind == rtc.TrackKind.KIND_AUDIO and j not in audio_rx:
            audio_rx[j] = ToneReceiver(track, tone_of(j), frame_size_ms=100)

    room.on("track_subscribed", on_subscribed)
    video = CounterVideoPublisher(320, 240, 15, base=args.index << 12)
    audio = TonePublisher(tone_of(args.index), chunk_ms=100)
    try:
        await asyncio.wait_for(room.connect(args.url, args.token), 30)
        await video.publish(room)
        await audio.publish(room)
        while len(video_rx) < args.peers or len(audio_rx) < args.peers:
            if time.monotonic() - started > args.ready_timeout:
                print(f"NOT-READY video={sorted(video_rx)} audio={sorted(audio_rx)}", flush=True)
                return 3
            await asyncio.sleep(0.1)
        print("READY", flush=True)

        line = await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), args.max_seconds)
        if not line.startswith("RUN "):
            return 0
        seconds = min(float(line.split()[1]), args.max_seconds)
        sent_video0, sent_audio0 = video.sent, audio.samples_sent
        t0 = time.monotonic()
        await asyncio.sleep(seconds)
        t1 = time.monotonic()
        last_from = t1 - args.last
        stats = {
            "index": args.index,
            "sent_fps": (video.sent - sent_video0) / (t1 - t0),
            "sent_audio_ratio": (audio.samples_sent - sent_audio0) / 48000 / (t1 - t0),
            "from": {},
        }
        for j in sorted(set(video_rx) | set(audio_rx)):
            v, a = video_rx.get(j), audio_rx.get(j)
            readable = [f.counter for f in v.frames if f.counter is not None] if v else []
            stats["from"][str(j)] = {
                "frames": len(v.frames) if v else 0,
                "readable": len(readable),
                "wrong_publisher": [c for c in readable if c >> 12 != j][:5],
                "recent_frames": len([f for f in v.frames if f.t >= last_from]) if v else 0,
                "tone_seconds": a.tone_seconds if a else 0.0,
                "recent_tone_seconds": len([t for t in a.tone_windows if t >= last_from]) * 0.1 if a else 0.0,
                "audio_received_seconds": a.samples_received / 48000 if a else 0.0,
                "other_peaks": [round(x) for x in a.peaks[-4:]] if a else [],
            }
        print("STATS " + json.dumps(stats), flush=True)
        remaining = max(1.0, args.max_seconds - (time.monotonic() - started))
        await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), remaining)
        return 0
    finally:
        for r in list(video_rx.values()) + list(audio_rx.values()):
            await r.close()
        await video.stop()
        await audio.stop()
        await disconnect_all(room)


if __name__ == "__main__":
    # Not asyncio.run(): its shutdown would wait for a stdin reader thread. os._exit also skips the
    # interpreter teardown of the SDK's native runtime.
    code = asyncio.new_event_loop().run_until_complete(main())
    sys.stdout.flush()
    os._exit(code)
