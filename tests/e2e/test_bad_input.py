"""Issue 2, acceptance item 3: bad input gets a clear error and the server keeps serving the room.

Every test here first starts a healthy room (alice publishing counter video), then abuses the
server, then proves the room still works: a fresh participant joins and decodes alice's frames,
and the server process is still alive without a panic (the `arbor` fixture checks that).

Raw WebSocket clients speak the LiveKit signalling protocol with the protobufs shipped in the
`livekit` Python package (`livekit.protocol.rtc`), the same wire format the SDKs use.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Optional
from urllib.parse import urlencode

import jwt
import pytest
import websockets
from google.protobuf import json_format
from livekit import rtc
from livekit.protocol import rtc as proto_rtc

from helpers import (
    API_KEY,
    API_SECRET,
    CounterVideoPublisher,
    assert_room_serves,
    connect,
    disconnect_all,
    make_token,
    wait_until,
)

ROOM = "abuse-room"
HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------------------
# A raw signalling client
# ---------------------------------------------------------------------------------------------


def rtc_url(server, token: Optional[str]) -> str:
    params = {"protocol": "16", "sdk": "python", "version": "1.2.0", "auto_subscribe": "1"}
    if token is not None:
        params["access_token"] = token
    return f"{server.ws_url}/rtc?{urlencode(params)}"


async def raw_connect(server, token: Optional[str]):
    return await websockets.connect(rtc_url(server, token), open_timeout=10, max_size=None)


async def upgrade_status(server, token: Optional[str]) -> tuple[int, str]:
    """Tries the WebSocket upgrade and returns the HTTP status and body of the refusal."""
    try:
        ws = await raw_connect(server, token)
    except websockets.exceptions.InvalidStatus as e:
        return e.response.status_code, (e.response.body or b"").decode(errors="replace")
    await ws.close()
    raise AssertionError("the WebSocket upgrade was accepted but should have been refused")


def parse_response(msg) -> proto_rtc.SignalResponse:
    if isinstance(msg, bytes):
        return proto_rtc.SignalResponse.FromString(msg)
    return json_format.Parse(msg, proto_rtc.SignalResponse(), ignore_unknown_fields=True)


async def recv_join(ws) -> proto_rtc.JoinResponse:
    first = parse_response(await asyncio.wait_for(ws.recv(), 10))
    assert first.WhichOneof("message") == "join", f"first message should be join, got {first}"
    return first.join


async def expect_rejection(ws, what: str, timeout: float = 15.0) -> str:
    """Waits for the server to refuse what was just sent: the connection is closed, or the server
    answers with a `leave`, or with a `request_response` whose reason is not OK."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(
                f"{what}: server neither closed the connection nor sent an error within "
                f"{timeout:.0f} s; it sent: {seen}"
            )
        try:
            msg = await asyncio.wait_for(ws.recv(), remaining)
        except asyncio.TimeoutError:
            continue
        except websockets.exceptions.ConnectionClosed as e:
            rcvd = e.rcvd
            return f"connection closed (code={rcvd.code if rcvd else None}, reason={rcvd.reason if rcvd else ''!r})"
        resp = parse_response(msg)
        kind = resp.WhichOneof("message")
        seen.append(kind)
        if kind == "leave":
            return f"leave(reason={resp.leave.reason}, action={resp.leave.action})"
        if kind == "request_response" and resp.request_response.reason != proto_rtc.RequestResponse.OK:
            rr = resp.request_response
            return f"request_response(reason={proto_rtc.RequestResponse.Reason.Name(rr.reason)}, message={rr.message!r})"


# ---------------------------------------------------------------------------------------------
# A healthy room to abuse
# ---------------------------------------------------------------------------------------------


@pytest.fixture
async def live_room(arbor):
    """alice publishes counter video in ROOM for the duration of the test."""
    room, events = await connect(arbor.ws_url, make_token("alice", ROOM), "alice")
    video = CounterVideoPublisher(320, 240, 15)
    await video.publish(room)
    yield room, events
    await video.stop()
    await disconnect_all(room)


async def still_serving(arbor, alice: rtc.Room, label: str) -> None:
    assert arbor.alive(), "arbor exited"
    assert arbor.health() == "OK"
    assert alice.connection_state == rtc.ConnectionState.CONN_CONNECTED, "alice lost her connection"
    n = await assert_room_serves(arbor.ws_url, ROOM, "alice", label)
    print(f"{label}: room still serves, {n} readable frames decoded after the abuse")


# ---------------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------------


def forged_token(**overrides) -> str:
    now = int(time.time())
    claims = {
        "iss": API_KEY,
        "sub": "mallory",
        "name": "mallory",
        "nbf": now - 10,
        "exp": now + 3600,
        "video": {"roomJoin": True, "room": ROOM, "canPublish": True, "canSubscribe": True},
    }
    secret = overrides.pop("_secret", API_SECRET)
    claims.update(overrides)
    return jwt.encode(claims, secret, algorithm="HS256")


@pytest.mark.parametrize(
    "case",
    ["no_token", "wrong_signature", "expired", "no_room_join", "garbage_token"],
)
async def test_bad_tokens_are_refused(arbor, live_room, case):
    alice, _ = live_room
    token = {
        "no_token": None,
        "wrong_signature": forged_token(_secret="not-the-secret"),
        "expired": forged_token(nbf=int(time.time()) - 7200, exp=int(time.time()) - 3600),
        "no_room_join": make_token("mallory", ROOM, room_join=False),
        "garbage_token": "not.a.jwt",
    }[case]
    allowed = (403, 401) if case == "no_room_join" else (401,)
    status, body = await upgrade_status(arbor, token)
    print(f"{case}: HTTP {status} {body!r}")
    assert status in allowed, f"{case}: expected HTTP {allowed}, got {status} ({body!r})"
    assert body.strip(), f"{case}: the {status} refusal should say why in its body"
    # A clear error names the actual problem, so an operator can fix the right thing.
    must_mention = {"expired": "expired", "wrong_signature": "signature", "no_room_join": "roomjoin"}
    if case in must_mention:
        assert must_mention[case] in body.lower(), (
            f"{case}: the refusal should mention {must_mention[case]!r}, got {body!r}"
        )

    # The validate endpoint the JS SDK uses must refuse the same way.
    import urllib.error
    import urllib.request

    q = "" if token is None else "?" + urlencode({"access_token": token})
    try:
        urllib.request.urlopen(f"{arbor.http_url}/rtc/validate{q}", timeout=5)
        raise AssertionError(f"{case}: /rtc/validate accepted a bad token")
    except urllib.error.HTTPError as e:
        assert e.code in allowed, f"{case}: /rtc/validate answered {e.code}, expected {allowed}"

    # The Python SDK reports the failure as an error instead of hanging.
    if token is not None:
        room = rtc.Room()
        with pytest.raises(rtc.ConnectError):
            await asyncio.wait_for(room.connect(arbor.ws_url, token), 30)
        await disconnect_all(room)

    await still_serving(arbor, alice, f"after-{case}")


# ---------------------------------------------------------------------------------------------
# Permissions
# ---------------------------------------------------------------------------------------------


async def test_publish_without_can_publish_fails(arbor, live_room):
    alice, alice_events = live_room
    # Through the SDK: publishing must fail, and nobody may see a track from this participant.
    viewer, viewer_events = await connect(
        arbor.ws_url, make_token("viewer", ROOM, can_publish=False, can_publish_data=False), "viewer"
    )
    try:
        assert not viewer.local_participant.permissions.can_publish, (
            "the JoinResponse should tell the client it may not publish"
        )
        video = CounterVideoPublisher(320, 240, 15)
        with pytest.raises(Exception) as err:
            await asyncio.wait_for(
                viewer.local_participant.publish_track(
                    video.track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_CAMERA)
                ),
                40,
            )
        print(f"SDK publish without canPublish raised: {err.type.__name__}: {err.value}")
        assert err.type is not asyncio.TimeoutError, "publish_track hung instead of failing"
        await asyncio.sleep(2)
        assert not alice_events.find("track_published", lambda pub, p: p.identity == "viewer"), (
            "alice saw a track published by a participant without canPublish"
        )
        # The viewer may still subscribe: it receives alice's video.
        ev = await viewer_events.wait(
            "track_subscribed", lambda t, pub, p: p.identity == "alice", timeout=30
        )
        assert ev.args[0].kind == rtc.TrackKind.KIND_VIDEO
    finally:
        await disconnect_all(viewer)

    # On the wire: AddTrackRequest from a participant without canPublish gets an error, never
    # a TrackPublishedResponse.
    ws = await raw_connect(arbor, make_token("raw-viewer", ROOM, can_publish=False))
    try:
        join = await recv_join(ws)
        assert not join.participant.permission.can_publish
        req = proto_rtc.SignalRequest(
            add_track=proto_rtc.AddTrackRequest(
                cid="raw-cid-1", name="camera", type=1, width=320, height=240, source=1
            )
        )
        await ws.send(req.SerializeToString())
        seen = []
        deadline = time.monotonic() + 10
        error = None
        while time.monotonic() < deadline and error is None:
            try:
                resp = parse_response(await asyncio.wait_for(ws.recv(), deadline - time.monotonic()))
            except (asyncio.TimeoutError, websockets.exceptions.ConnectionClosed) as e:
                error = f"{type(e).__name__}"
                break
            kind = resp.WhichOneof("message")
            seen.append(kind)
            assert kind != "track_published", "server accepted add_track without canPublish"
            if kind == "request_response" and resp.request_response.reason != proto_rtc.RequestResponse.OK:
                rr = resp.request_response
                error = f"request_response {proto_rtc.RequestResponse.Reason.Name(rr.reason)}: {rr.message}"
                print(f"request_response in full: {rr}")
            if kind == "leave":
                error = "leave"
        print(f"raw add_track without canPublish answered with: {error}; messages seen: {seen}")
        assert error is not None and error != "TimeoutError", (
            f"add_track without canPublish got no error from the server within 10 s (saw {seen})"
        )
    finally:
        await ws.close()
    await still_serving(arbor, alice, "after-no-publish")


# ---------------------------------------------------------------------------------------------
# Garbage on the signalling WebSocket
# ---------------------------------------------------------------------------------------------

OVERSIZED_BYTES = 8 * 1024 * 1024


@pytest.mark.parametrize("case", ["garbage_binary", "garbage_text", "oversized"])
async def test_garbage_websocket_frames(arbor, live_room, case):
    alice, alice_events = live_room
    ws = await raw_connect(arbor, make_token(f"junk-{case}", ROOM))
    try:
        await recv_join(ws)
        if case == "garbage_binary":
            await ws.send(b"\xff\xfe\xfd\x00garbage that is not a protobuf\x07\x08" * 3)
        elif case == "garbage_text":
            await ws.send("{this is not json nor protojson")
        else:
            # A well-formed SignalRequest far larger than any signalling message.
            big = proto_rtc.SignalRequest(
                update_metadata=proto_rtc.UpdateParticipantMetadata(metadata="x" * OVERSIZED_BYTES)
            )
            with contextlib.suppress(websockets.exceptions.ConnectionClosed):
                await ws.send(big.SerializeToString())
        outcome = await expect_rejection(ws, case)
        print(f"{case}: {outcome}")
    finally:
        await ws.close()
    if case == "oversized":
        assert not alice_events.find("participant_metadata_changed"), "oversized metadata was applied"
    await still_serving(arbor, alice, f"after-{case}")


async def test_malformed_sdp_offer(arbor, live_room):
    alice, _ = live_room
    ws = await raw_connect(arbor, make_token("bad-sdp", ROOM))
    try:
        await recv_join(ws)
        offer = proto_rtc.SignalRequest(
            offer=proto_rtc.SessionDescription(
                type="offer", sdp="v=0\r\nthis is not\r\nm=an sdp offer at all\r\n\x00\x01", id=1
            )
        )
        await ws.send(offer.SerializeToString())
        outcome = await expect_rejection(ws, "malformed SDP offer")
        print(f"malformed SDP offer: {outcome}")
    finally:
        await ws.close()
    await still_serving(arbor, alice, "after-bad-sdp")


# ---------------------------------------------------------------------------------------------
# A client that vanishes without `leave`
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(180)
@pytest.mark.parametrize("how", ["sigkill", "sigstop"])
async def test_vanished_client_is_dropped(arbor, live_room, results, how):
    """A client disappears without `leave`.

    sigkill: the process dies; the kernel closes its TCP connection, so the server can notice at
    once. sigstop: the process freezes with its connection open; it stops answering pings and
    sending media, so only the server's ping timeout (LiveKit: 15 s) can drop it.
    """
    alice, alice_events = live_room
    proc = subprocess.Popen(
        [
            sys.executable,
            str(HERE / "clients" / "publisher.py"),
            "--url", arbor.ws_url,
            "--token", make_token("ghost", ROOM),
            "--seconds", "120",
        ],
        stdout=subprocess.PIPE,
        stderr=open(arbor.log_path.with_suffix(".ghost.log"), "wb"),
        text=True,
    )
    try:
        loop = asyncio.get_running_loop()
        line = await asyncio.wait_for(loop.run_in_executor(None, proc.stdout.readline), 60)
        assert line.startswith("READY"), (
            f"ghost client did not start: {line!r}; its log: "
            f"{arbor.log_path.with_suffix('.ghost.log').read_text(errors='replace')[-3000:]}"
        )
        await alice_events.wait("participant_connected", lambda p: p.identity == "ghost", timeout=20)
        await alice_events.wait(
            "track_subscribed", lambda t, pub, p: p.identity == "ghost", timeout=30
        )
        os.kill(proc.pid, signal.SIGKILL if how == "sigkill" else signal.SIGSTOP)
        killed_at = time.monotonic()
        ev = await alice_events.wait(
            "participant_disconnected", lambda p: p.identity == "ghost", timeout=60
        )
        gone_after = ev.t - killed_at
        results(f"vanished_client_detected_s={gone_after:.1f} ({how.upper()} -> participant_disconnected)")
        assert "ghost" not in alice.remote_participants
        await alice_events.wait(
            "track_unsubscribed", lambda t, pub, p: p.identity == "ghost", timeout=20
        )
    finally:
        if proc.poll() is None:
            proc.kill()  # also ends a stopped process
            proc.wait(timeout=10)
    await still_serving(arbor, alice, f"after-vanish-{how}")
