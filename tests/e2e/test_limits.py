"""Issue 3: limits named in the config are enforced with a clear error, never a crash.

One server runs with small limits (`limit.signal_rate`, `limit.max_tracks_per_participant`,
`limit.max_metadata_bytes`, `limit.max_data_packet_bytes`). A well-behaved SDK participant (alice)
stays in the room throughout and must be unaffected by the offenders, which speak the signalling
protocol directly (raw WebSocket + LiveKit protobufs) or use the SDK.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request

import pytest
import websockets
from livekit import api, rtc
from livekit.protocol import rtc as proto_rtc

from conftest import WORK, start_arbor, stop_arbor
from helpers import API_KEY, API_SECRET, connect, disconnect_all, make_token, wait_until
from test_bad_input import parse_response, raw_connect, recv_join

ROOM = "limits-room"


def token(identity: str, *, update_own_metadata: bool = False) -> str:
    grants = api.VideoGrants(room_join=True, room=ROOM, can_publish=True, can_subscribe=True,
                             can_publish_data=True, can_update_own_metadata=update_own_metadata)
    return api.AccessToken(API_KEY, API_SECRET).with_identity(identity).with_grants(grants).to_jwt()


async def next_error(ws, timeout: float = 10.0) -> proto_rtc.RequestResponse:
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, "no request_response error within the timeout"
        resp = parse_response(await asyncio.wait_for(ws.recv(), remaining))
        if resp.WhichOneof("message") == "request_response":
            return resp.request_response


def metric(server, name: str) -> int:
    with urllib.request.urlopen(f"{server.http_url}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return int(float(line.split()[1]))
    raise AssertionError(f"metric {name} missing")


@pytest.fixture
def limited(request):
    cfg = WORK / "limits-config.yaml"
    cfg.write_text(
        "limit:\n"
        "  signal_rate: 20\n"
        "  signal_burst: 40\n"
        "  max_tracks_per_participant: 1\n"
        "  max_metadata_bytes: 1000\n"
        "  max_data_packet_bytes: 2000\n"
    )
    server = start_arbor("test_limits", ("--config", str(cfg)))
    request.node.arbor_servers = [server]
    yield server
    died = not server.alive()
    stop_arbor(server)
    assert not died, "arbor died"
    assert "panicked at" not in server.log_text()


@pytest.mark.timeout(120)
async def test_limits_give_clear_errors(limited):
    server = limited
    alice = bob = None
    try:
        alice, a_ev = await connect(server.ws_url, make_token("alice", ROOM), "alice")
        bob, b_ev = await connect(server.ws_url, make_token("bob", ROOM), "bob")

        # --- tracks per participant ----------------------------------------------------------
        ws = await raw_connect(server, token("raw-tracks"))
        try:
            await recv_join(ws)
            for i in (1, 2):
                req = proto_rtc.SignalRequest(add_track=proto_rtc.AddTrackRequest(
                    cid=f"cid-{i}", name="mic", type=0, source=2))
                await ws.send(req.SerializeToString())
            first = parse_response(await asyncio.wait_for(ws.recv(), 10))
            while first.WhichOneof("message") != "track_published":
                first = parse_response(await asyncio.wait_for(ws.recv(), 10))
            assert first.track_published.cid == "cid-1"
            err = await next_error(ws)
            assert err.reason == proto_rtc.RequestResponse.LIMIT_EXCEEDED, err
            assert "max_tracks_per_participant" in err.message, err
        finally:
            await ws.close()

        # --- metadata size (client-side update) ----------------------------------------------
        ws = await raw_connect(server, token("raw-meta", update_own_metadata=True))
        try:
            await recv_join(ws)
            req = proto_rtc.SignalRequest(update_metadata=proto_rtc.UpdateParticipantMetadata(
                metadata="x" * 5000, request_id=7))
            await ws.send(req.SerializeToString())
            err = await next_error(ws)
            assert err.request_id == 7 and err.reason == proto_rtc.RequestResponse.LIMIT_EXCEEDED, err
            assert "max_metadata_bytes" in err.message, err
            # A small update from the same participant is fine and reaches alice.
            req = proto_rtc.SignalRequest(update_metadata=proto_rtc.UpdateParticipantMetadata(
                metadata="small", request_id=8))
            await ws.send(req.SerializeToString())
            await wait_until(
                lambda: (p := alice.remote_participants.get("raw-meta")) is not None
                and p.metadata == "small", 10, "alice to see raw-meta's metadata")
        finally:
            await ws.close()

        # --- data packet size: dropped and counted, smaller ones delivered --------------------
        dropped = metric(server, "arbor_data_messages_dropped_total")
        await bob.local_participant.publish_data(b"y" * 5000, reliable=True, topic="big")
        await bob.local_participant.publish_data(b"ok", reliable=True, topic="small")
        await a_ev.wait("data_received", lambda d: d.topic == "small")
        assert not a_ev.find("data_received", lambda d: d.topic == "big"), "oversized data delivered"
        await wait_until(lambda: metric(server, "arbor_data_messages_dropped_total") > dropped, 10,
                         "the oversized packet to be counted as dropped")

        # --- signal rate: a flooding client is disconnected with the reason ------------------
        ws = await raw_connect(server, token("flooder"))
        await recv_join(ws)
        await a_ev.wait("participant_connected", lambda p: p.identity == "flooder")
        close = None
        try:
            for i in range(500):
                await ws.send(proto_rtc.SignalRequest(ping=i).SerializeToString())
            while True:
                await asyncio.wait_for(ws.recv(), 10)
        except websockets.exceptions.ConnectionClosed as e:
            close = e.rcvd
        assert close is not None and close.code == 1008, close
        assert "limit.signal_rate" in close.reason, close.reason
        print(f"RESULT: flooder closed with {close.code}: {close.reason}")
        await a_ev.wait("participant_disconnected", lambda p: p.identity == "flooder")
        assert metric(server, "arbor_signal_rate_limited_total") >= 1

        # alice and bob were never disturbed.
        assert alice.connection_state == rtc.ConnectionState.CONN_CONNECTED
        assert bob.connection_state == rtc.ConnectionState.CONN_CONNECTED
        await bob.local_participant.publish_data(b"still-here", reliable=True, topic="end")
        await a_ev.wait("data_received", lambda d: d.topic == "end")
    finally:
        await disconnect_all(alice, bob)
