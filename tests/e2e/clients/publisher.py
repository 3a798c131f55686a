"""A stand-alone Python SDK participant that joins, publishes counter video, prints READY and waits.

Run as a subprocess by test_bad_input.py, which then SIGKILLs it: the process disappears without a
`leave`, so the server can only notice through its ping timeout. Bounded: exits by itself after
`--seconds`.

    python clients/publisher.py --url ws://127.0.0.1:PORT --token JWT [--seconds 120]
"""

import argparse
import asyncio
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from helpers import CounterVideoPublisher, connect  # noqa: E402


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--seconds", type=float, default=120.0)
    args = ap.parse_args()
    room, _ = await connect(args.url, args.token, "subprocess")
    video = CounterVideoPublisher(320, 240, 15)
    pub = await video.publish(room)
    print(f"READY {pub.sid}", flush=True)
    await asyncio.sleep(args.seconds)
    await video.stop()
    await room.disconnect()


if __name__ == "__main__":
    asyncio.run(main())
