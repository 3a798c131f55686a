"""Issue 3, acceptance item 2: webhooks a LiveKit application already consumes.

Arbor is started with four webhook URLs served by an aiohttp app inside this test:

* `/good` answers 200 at once; it must receive, in order, the whole life of the room: room_started,
  participant_joined (alice, sent when she becomes active), track_published,
  participant_connection_aborted (ghost: signalling only, never active), participant_joined (bob),
  track_unpublished, participant_left (bob, CLIENT_INITIATED), participant_left (alice),
  room_finished. Every event is
  verified with `livekit-api`'s `WebhookReceiver` (JWT signature and body SHA-256).
* `/flaky` fails the first attempt at every event with 503; retries must still deliver every
  event exactly in order.
* `/stall` holds every request for 10 s before answering: signalling must not notice (joins,
  publishing and leaving stay fast) and the other receivers are not delayed by it.
* a URL where nothing listens: its events are retried, then dropped and counted in /metrics.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path

import pytest
from aiohttp import web
from livekit import api

from conftest import WORK, free_port, start_arbor, stop_arbor
from helpers import API_KEY, API_SECRET, TonePublisher, connect, disconnect_all, make_token, wait_until
from test_bad_input import raw_connect, recv_join

ROOM = "hooks"
EXPECTED = [
    ("room_started", None),
    ("participant_joined", "alice"),
    ("track_published", "alice"),
    ("participant_connection_aborted", "ghost"),
    ("participant_joined", "bob"),
    ("track_unpublished", "alice"),
    ("participant_left", "bob"),
    ("participant_left", "alice"),
    ("room_finished", None),
]


class Receiver:
    """Records verified webhook events per path."""

    def __init__(self) -> None:
        self.verifier = api.WebhookReceiver(api.TokenVerifier(API_KEY, API_SECRET))
        self.events: dict[str, list[api.WebhookEvent]] = {"good": [], "flaky": [], "stall": []}
        self.failures: list[str] = []
        self.flaky_seen: set[str] = set()
        self.stall_requests = 0

    async def handle(self, request: web.Request) -> web.Response:
        path = request.match_info["path"]
        body = await request.text()
        if request.headers.get("Content-Type") != "application/webhook+json":
            self.failures.append(f"{path}: Content-Type {request.headers.get('Content-Type')!r}")
        try:
            ev = self.verifier.receive(body, request.headers.get("Authorization", ""))
        except Exception as e:  # a bad signature is a test failure, reported at the end
            self.failures.append(f"{path}: verification failed: {e}")
            return web.Response(status=401)
        if path == "flaky" and ev.id not in self.flaky_seen:
            self.flaky_seen.add(ev.id)
            return web.Response(status=503, text="try again")
        if path == "stall":
            self.stall_requests += 1
            await asyncio.sleep(10)
        self.events[path].append(ev)
        return web.Response(text="ok")


def names(events: list[api.WebhookEvent]) -> list[tuple[str, object]]:
    out = []
    for e in events:
        if e.room.name != ROOM:
            continue
        who = e.participant.identity if e.HasField("participant") and e.participant.identity else None
        out.append((e.event, who))
    return out


@pytest.mark.timeout(180)
async def test_webhooks_signed_ordered_and_never_blocking(request):
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/{path}", receiver.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    hook_port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", hook_port)
    await site.start()
    dead_port = free_port()  # nothing listens here

    cfg = WORK / "webhooks-config.yaml"
    base = f"http://127.0.0.1:{hook_port}"
    cfg.write_text(
        "webhook:\n"
        f"  urls: [{base}/good, {base}/flaky, {base}/stall, http://127.0.0.1:{dead_port}/dead]\n"
        "  request_timeout_ms: 15000\n"
        "  retry_backoff_ms: 100\n"
        "  max_attempts: 3\n"
        "room:\n"
        "  departure_timeout: 1\n"
    )
    server = start_arbor("test_webhooks", ("--config", str(cfg)))
    request.node.arbor_servers = [server]
    alice = bob = None
    tone = None
    try:
        # --- signalling stays fast while /stall holds its first request ---------------------
        t0 = time.monotonic()
        alice, a_ev = await connect(server.ws_url, make_token("alice", ROOM), "alice")
        alice_join = time.monotonic() - t0
        tone = TonePublisher(440.0)
        pub = await tone.publish(alice)
        await wait_until(lambda: receiver.stall_requests >= 1, 10, "/stall to be holding a request")
        # The track is published in the room (and so in the event order) once its media is
        # negotiated, which can be after publish_track() returns: wait for it before bob joins.
        await wait_until(lambda: ("track_published", "alice") in names(receiver.events["good"]), 10,
                         "/good to receive track_published")
        # A participant that never becomes active (signalling only, no media) leaves as
        # participant_connection_aborted, without a participant_joined (as LiveKit does).
        ws = await raw_connect(server, make_token("ghost", ROOM))
        await recv_join(ws)
        await ws.close()
        await wait_until(
            lambda: ("participant_connection_aborted", "ghost") in names(receiver.events["good"]),
            10, "/good to receive participant_connection_aborted for ghost")
        t0 = time.monotonic()
        bob, b_ev = await connect(server.ws_url, make_token("bob", ROOM), "bob")
        bob_join = time.monotonic() - t0
        await b_ev.wait("track_subscribed", lambda t, p, rp: rp.identity == "alice")
        t0 = time.monotonic()
        await asyncio.wait_for(alice.local_participant.unpublish_track(pub.sid), 10)
        await b_ev.wait("track_unpublished", lambda p, rp: rp.identity == "alice")
        unpublish = time.monotonic() - t0
        print(f"RESULT: with /stall holding requests: alice join {alice_join:.2f} s, "
              f"bob join {bob_join:.2f} s, unpublish seen by bob {unpublish:.2f} s")
        # Generous sanity bounds: a blocked webhook would show up as >= 10 s.
        assert bob_join < 8 and unpublish < 8, (bob_join, unpublish)
        await tone.stop()
        tone = None
        await asyncio.wait_for(bob.disconnect(), 10)
        bob = None
        await asyncio.wait_for(alice.disconnect(), 10)
        alice = None

        # --- /good and /flaky get the whole life of the room, in order -------------------------
        await wait_until(lambda: len(names(receiver.events["good"])) >= len(EXPECTED), 30,
                         "/good to receive the room's whole life")
        await wait_until(lambda: len(names(receiver.events["flaky"])) >= len(EXPECTED), 30,
                         "/flaky to receive the room's whole life despite failures")
        assert not receiver.failures, receiver.failures
        for path in ("good", "flaky"):
            got = names(receiver.events[path])
            assert got == EXPECTED, f"/{path} got {got}"
        good = [e for e in receiver.events["good"] if e.room.name == ROOM]
        left_bob = good[6]
        assert left_bob.participant.disconnect_reason == api.DisconnectReason.CLIENT_INITIATED, left_bob
        assert good[2].track.sid == pub.sid and good[5].track.sid == pub.sid
        assert all(e.id.startswith("EV_") and e.created_at > 0 for e in good)
        assert len({e.id for e in good}) == len(good), "event ids must be unique"
        assert good[0].room.sid == good[-1].room.sid and good[0].room.sid.startswith("RM_")
        # Every event got exactly one failed attempt at /flaky, then a delivery.
        assert len(receiver.flaky_seen) >= len(EXPECTED)

        # --- the dead URL's events are retried, dropped and counted -----------------------------
        def metric(name: str) -> int:
            with urllib.request.urlopen(f"{server.http_url}/metrics", timeout=5) as r:
                for line in r.read().decode().splitlines():
                    if line.startswith(name + " "):
                        return int(float(line.split()[1]))
            raise AssertionError(f"metric {name} missing")

        await wait_until(lambda: metric("arbor_webhook_events_dropped_total") >= len(EXPECTED), 30,
                         "the dead receiver's events to be dropped and counted")
        assert metric("arbor_webhook_failed_attempts_total") >= len(EXPECTED) * 3
        delivered = metric("arbor_webhook_events_delivered_total")
        assert delivered >= 2 * len(EXPECTED), delivered
        # /stall is still working through its queue; it was never allowed to block anything.
        print(f"RESULT: /stall has received {receiver.stall_requests} request(s) "
              f"while /good received {len(receiver.events['good'])}")
        assert len(receiver.events["stall"]) < len(EXPECTED)
    finally:
        if tone:
            await tone.stop()
        await disconnect_all(alice, bob)
        stop_arbor(server)
        await runner.cleanup()
    assert "panicked at" not in server.log_text()
