"""Issue 3, acceptance items 1 and 3: LiveKit's server SDKs manage Arbor rooms unchanged.

The same scenario runs twice: once through Python `livekit-api` (Twirp with protobuf bodies) and
once through Node `livekit-server-sdk` (Twirp with proto3 JSON bodies, one `node` process per
call, see js/server_api.mjs). Three real Python SDK participants sit in the room and must observe
the effect of every RoomService method: room metadata, participant metadata/name/attributes, a
server-side mute, a revoked publish permission, subscriptions switched off and on, data from the
server (addressed and broadcast), an RPC answered by a participant, removal, and room deletion.

Wrong grants, an unknown room, malformed bodies and unknown methods must give Twirp errors and
change nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

import pytest
from google.protobuf import json_format
from livekit import api, rtc

from helpers import (
    API_KEY,
    API_SECRET,
    TonePublisher,
    ToneReceiver,
    connect,
    disconnect_all,
    wait_until,
)

HERE = Path(__file__).resolve().parent
JS = HERE / "js"


class ApiError(Exception):
    def __init__(self, status: Optional[int], code: Optional[str], message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


def participant_token(identity: str, room: str, *, update_own_metadata: bool = True) -> str:
    grants = api.VideoGrants(
        room_join=True,
        room=room,
        can_publish=True,
        can_subscribe=True,
        can_publish_data=True,
        can_update_own_metadata=update_own_metadata,
    )
    return (
        api.AccessToken(API_KEY, API_SECRET)
        .with_identity(identity)
        .with_name(identity)
        .with_grants(grants)
        .to_jwt()
    )


# Request message types by method, for the protobuf driver.
REQUESTS = {
    "CreateRoom": (api.CreateRoomRequest, "create_room"),
    "ListRooms": (api.ListRoomsRequest, "list_rooms"),
    "DeleteRoom": (api.DeleteRoomRequest, "delete_room"),
    "ListParticipants": (api.ListParticipantsRequest, "list_participants"),
    "GetParticipant": (api.RoomParticipantIdentity, "get_participant"),
    "RemoveParticipant": (api.RoomParticipantIdentity, "remove_participant"),
    "MutePublishedTrack": (api.MuteRoomTrackRequest, "mute_published_track"),
    "UpdateParticipant": (api.UpdateParticipantRequest, "update_participant"),
    "UpdateSubscriptions": (api.UpdateSubscriptionsRequest, "update_subscriptions"),
    "SendData": (api.SendDataRequest, "send_data"),
    "UpdateRoomMetadata": (api.UpdateRoomMetadataRequest, "update_room_metadata"),
    "PerformRpc": (api.PerformRpcRequest, None),
}


class PythonDriver:
    """RoomService through Python `livekit-api` (application/protobuf)."""

    name = "python-protobuf"

    def __init__(self, url: str) -> None:
        self.url = url
        self.lk: Optional[api.LiveKitAPI] = None

    async def __aenter__(self) -> "PythonDriver":
        self.lk = api.LiveKitAPI(self.url, API_KEY, API_SECRET, failover=False)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self.lk:
            await self.lk.aclose()

    async def call(self, method: str, args: dict) -> dict:
        assert self.lk is not None
        req_type, attr = REQUESTS[method]
        args = dict(args)
        if method == "SendData":
            data = args.pop("data").encode()
            lossy = args.pop("lossy", False)
            req = json_format.ParseDict(args, req_type())
            req.data = data
            req.kind = api.DataPacket.LOSSY if lossy else api.DataPacket.RELIABLE
        else:
            req = json_format.ParseDict(args, req_type())
        try:
            if attr is None:
                # livekit-api 1.2 has no perform_rpc helper: use its Twirp client.
                room = self.lk.room
                resp = await room._client.request(
                    "RoomService",
                    "PerformRpc",
                    req,
                    room._auth_header(api.VideoGrants(room_admin=True, room=req.room)),
                    api.PerformRpcResponse,
                )
            else:
                resp = await getattr(self.lk.room, attr)(req)
        except api.TwirpError as e:
            raise ApiError(e.status, e.code, e.message) from None
        return json_format.MessageToDict(resp) if resp is not None else {}


class NodeDriver:
    """RoomService through Node `livekit-server-sdk` (application/json)."""

    name = "node-json"

    def __init__(self, url: str) -> None:
        self.url = url

    async def __aenter__(self) -> "NodeDriver":
        if not shutil.which("node"):
            pytest.fail("node is not installed")
        if not (JS / "node_modules" / "livekit-server-sdk").is_dir():
            pytest.fail("livekit-server-sdk missing: run `npm ci` in tests/e2e/js (scripts/test does)")
        return self

    async def __aexit__(self, *exc: Any) -> None:
        pass

    async def call(self, method: str, args: dict) -> dict:
        env = dict(os.environ, LIVEKIT_API_KEY=API_KEY, LIVEKIT_API_SECRET=API_SECRET)
        proc = await asyncio.create_subprocess_exec(
            "node", str(JS / "server_api.mjs"), self.url, method, json.dumps(args),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=JS,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        lines = [l for l in out.decode().splitlines() if l.startswith("{")]
        if not lines:
            raise AssertionError(f"node {method} printed nothing; stderr:\n{err.decode()}")
        r = json.loads(lines[-1])
        if "error" in r:
            e = r["error"]
            raise ApiError(e.get("status"), e.get("code"), e.get("message", ""))
        return r["ok"] or {}


DRIVERS = {"python": PythonDriver, "node": NodeDriver}


def identities(resp: dict) -> set[str]:
    return {p["identity"] for p in resp.get("participants", [])}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("sdk", ["python", "node"])
async def test_room_service_every_method(arbor, sdk, results):
    room_name = f"api-{sdk}"
    alice = bob = carol = None
    tone = None
    receivers: list = []
    async with DRIVERS[sdk](arbor.http_url) as lk:
        try:
            # --- CreateRoom / ListRooms ------------------------------------------------------
            created = await lk.call(
                "CreateRoom",
                {"name": room_name, "emptyTimeout": 120, "maxParticipants": 3, "metadata": "m0"},
            )
            assert created["name"] == room_name and created["sid"].startswith("RM_"), created
            assert created["metadata"] == "m0" and created["maxParticipants"] == 3, created
            assert created["emptyTimeout"] == 120, created
            rooms = await lk.call("ListRooms", {})
            assert [r["name"] for r in rooms.get("rooms", [])] == [room_name], rooms
            assert (await lk.call("ListRooms", {"names": ["nope"]})).get("rooms", []) == []

            # --- three participants join; alice publishes audio --------------------------------
            alice, a_ev = await connect(arbor.ws_url, participant_token("alice", room_name), "alice")
            bob, b_ev = await connect(arbor.ws_url, participant_token("bob", room_name), "bob")
            carol, c_ev = await connect(arbor.ws_url, participant_token("carol", room_name), "carol")
            assert bob.metadata == "m0", "room metadata from CreateRoom must reach participants"
            # maxParticipants = 3: a fourth is refused with a clear error, not a crash.
            extra = rtc.Room()
            with pytest.raises(Exception):
                await asyncio.wait_for(
                    extra.connect(arbor.ws_url, participant_token("dave", room_name)), 15
                )
            await disconnect_all(extra)
            tone = TonePublisher(440.0)
            pub = await tone.publish(alice)
            track_sid = pub.sid
            await b_ev.wait("track_subscribed", lambda t, p, rp: rp.identity == "alice")
            await c_ev.wait("track_subscribed", lambda t, p, rp: rp.identity == "alice")

            # --- UpdateSubscriptions: carol off, then on again --------------------------------
            # The SDKs do not report a server-side unsubscription as an event (only unpublishing
            # or their own set_subscribed does), so the effect is checked on the media: carol
            # stops hearing alice's tone, and hears it again on a fresh track after resubscribing.
            ev = c_ev.find("track_subscribed", lambda t, p, rp: rp.identity == "alice")[0]
            recv = ToneReceiver(ev.args[0], 440.0)
            receivers.append(recv)
            await wait_until(lambda: len(recv.tone_windows) >= 5, 20, "carol to hear alice's tone")
            await lk.call(
                "UpdateSubscriptions",
                {"room": room_name, "identity": "carol", "trackSids": [track_sid], "subscribe": False},
            )
            await asyncio.sleep(1.5)
            heard = len(recv.tone_windows)
            await asyncio.sleep(2.0)
            assert len(recv.tone_windows) - heard <= 2, (
                f"carol still hears alice after UpdateSubscriptions(subscribe=false): "
                f"{len(recv.tone_windows) - heard} tone windows in 2 s"
            )
            n_sub = len(c_ev.find("track_subscribed"))
            await lk.call(
                "UpdateSubscriptions",
                {"room": room_name, "identity": "carol", "trackSids": [track_sid], "subscribe": True},
            )
            await wait_until(lambda: len(c_ev.find("track_subscribed")) > n_sub, 20,
                             "carol to be subscribed again")
            recv2 = ToneReceiver(c_ev.find("track_subscribed")[-1].args[0], 440.0)
            receivers.append(recv2)
            await wait_until(lambda: len(recv2.tone_windows) >= 5, 20,
                             "carol to hear alice's tone again after resubscribing")

            # --- ListParticipants / GetParticipant ---------------------------------------------
            parts = await lk.call("ListParticipants", {"room": room_name})
            assert identities(parts) == {"alice", "bob", "carol"}, parts
            info = await lk.call("GetParticipant", {"room": room_name, "identity": "alice"})
            assert info["identity"] == "alice" and info["sid"].startswith("PA_"), info
            assert [t["sid"] for t in info.get("tracks", [])] == [track_sid], info

            # --- MutePublishedTrack: the publisher is told, every subscriber sees it ----------
            muted = await lk.call(
                "MutePublishedTrack",
                {"room": room_name, "identity": "alice", "trackSid": track_sid, "muted": True},
            )
            assert muted["track"]["sid"] == track_sid and muted["track"]["muted"] is True, muted
            await b_ev.wait("track_muted", lambda p, pub: p.identity == "alice")
            await c_ev.wait("track_muted", lambda p, pub: p.identity == "alice")
            await wait_until(lambda: pub.muted, 10, "alice's own publication to be muted")

            # --- UpdateParticipant: metadata, name, attributes ----------------------------------
            upd = await lk.call(
                "UpdateParticipant",
                {
                    "room": room_name, "identity": "bob", "metadata": "bob-meta",
                    "name": "Bobby", "attributes": {"role": "speaker"},
                },
            )
            assert upd["metadata"] == "bob-meta" and upd["name"] == "Bobby", upd
            assert upd.get("attributes") == {"role": "speaker"}, upd

            def alice_sees_bob() -> bool:
                rp = alice.remote_participants.get("bob")
                return bool(rp and rp.metadata == "bob-meta" and rp.name == "Bobby"
                            and rp.attributes.get("role") == "speaker")

            await wait_until(alice_sees_bob, 10, "alice to see bob's new metadata/name/attributes")
            await wait_until(lambda: bob.local_participant.metadata == "bob-meta", 10,
                             "bob to see his own new metadata")

            # --- UpdateRoomMetadata reaches every participant ----------------------------------
            room_resp = await lk.call("UpdateRoomMetadata", {"room": room_name, "metadata": "m1"})
            assert room_resp["metadata"] == "m1", room_resp
            for r, who in ((alice, "alice"), (bob, "bob"), (carol, "carol")):
                await wait_until(lambda r=r: r.metadata == "m1", 10, f"{who} to see room metadata m1")

            # --- SendData: addressed, then broadcast ---------------------------------------------
            await lk.call(
                "SendData",
                {"room": room_name, "data": "to-bob", "destinationIdentities": ["bob"], "topic": "t1"},
            )
            ev = await b_ev.wait("data_received", lambda d: d.data == b"to-bob")
            assert ev.args[0].topic == "t1"
            await lk.call("SendData", {"room": room_name, "data": "to-all", "topic": "t2"})
            await c_ev.wait("data_received", lambda d: d.data == b"to-all")
            await a_ev.wait("data_received", lambda d: d.data == b"to-all")
            assert not c_ev.find("data_received", lambda d: d.data == b"to-bob"), \
                "data addressed to bob reached carol"

            # --- PerformRpc: answered by a participant; errors surface --------------------------
            @bob.local_participant.register_rpc_method("greet")
            async def greet(data: rtc.RpcInvocationData) -> str:
                return f"hello {data.payload}"

            @bob.local_participant.register_rpc_method("fail")
            async def fail(data: rtc.RpcInvocationData) -> str:
                raise rtc.RpcError(4321, "nope", "details")

            r = await lk.call(
                "PerformRpc",
                {"room": room_name, "destinationIdentity": "bob", "method": "greet", "payload": sdk},
            )
            assert r.get("payload") == f"hello {sdk}", r
            if sdk == "python":
                # Measured, not asserted: server API -> participant -> server API round trips.
                times = []
                for i in range(20):
                    t0 = time.monotonic()
                    r = await lk.call("PerformRpc", {"room": room_name, "destinationIdentity": "bob",
                                                     "method": "greet", "payload": str(i)})
                    times.append(time.monotonic() - t0)
                    assert r.get("payload") == f"hello {i}", r
                times.sort()
                t0 = time.monotonic()
                for _ in range(100):
                    await lk.call("ListParticipants", {"room": room_name})
                per_list = (time.monotonic() - t0) / 100
                results(f"server API (python, protobuf): PerformRpc round trip median "
                        f"{times[10] * 1000:.1f} ms, max {times[-1] * 1000:.1f} ms (20 calls); "
                        f"ListParticipants {per_list * 1000:.2f} ms per call (100 sequential)")
            with pytest.raises(ApiError) as ei:
                await lk.call(
                    "PerformRpc",
                    {"room": room_name, "destinationIdentity": "bob", "method": "fail", "payload": ""},
                )
            assert "nope" in ei.value.message, ei.value
            with pytest.raises(ApiError) as ei:
                await lk.call(
                    "PerformRpc",
                    {"room": room_name, "destinationIdentity": "nobody", "method": "greet"},
                )
            assert ei.value.code == "not_found", ei.value

            # --- UpdateParticipant permission: revoking canPublish unpublishes at once --------
            upd = await lk.call(
                "UpdateParticipant",
                {
                    "room": room_name, "identity": "alice",
                    "permission": {"canPublish": False, "canSubscribe": True, "canPublishData": True},
                },
            )
            assert upd["permission"].get("canPublish", False) is False, upd
            await b_ev.wait("track_unpublished", lambda p, rp: p.sid == track_sid)
            info = await lk.call("GetParticipant", {"room": room_name, "identity": "alice"})
            assert not info.get("tracks"), info

            # --- client-side metadata (canUpdateOwnMetadata) is broadcast ------------------------
            await asyncio.wait_for(carol.local_participant.set_metadata("carol-meta"), 10)
            await asyncio.wait_for(carol.local_participant.set_attributes({"mood": "ok"}), 10)
            await wait_until(
                lambda: (rp := bob.remote_participants.get("carol")) is not None
                and rp.metadata == "carol-meta" and rp.attributes.get("mood") == "ok",
                10, "bob to see carol's own metadata and attributes",
            )
            info = await lk.call("GetParticipant", {"room": room_name, "identity": "carol"})
            assert info["metadata"] == "carol-meta", info

            # --- RemoveParticipant ---------------------------------------------------------------
            await lk.call("RemoveParticipant", {"room": room_name, "identity": "carol"})
            ev = await c_ev.wait("disconnected")
            assert ev.args and ev.args[0] == rtc.DisconnectReason.PARTICIPANT_REMOVED, ev.args
            await a_ev.wait("participant_disconnected", lambda p: p.identity == "carol")
            parts = await lk.call("ListParticipants", {"room": room_name})
            assert identities(parts) == {"alice", "bob"}, parts
            with pytest.raises(ApiError) as ei:
                await lk.call("GetParticipant", {"room": room_name, "identity": "carol"})
            assert ei.value.code == "not_found" and ei.value.status == 404

            # --- DeleteRoom disconnects everyone -------------------------------------------------
            await lk.call("DeleteRoom", {"room": room_name})
            for log in (a_ev, b_ev):
                ev = await log.wait("disconnected")
                assert ev.args and ev.args[0] == rtc.DisconnectReason.ROOM_DELETED, ev.args
            assert (await lk.call("ListRooms", {})).get("rooms", []) == []
            with pytest.raises(ApiError) as ei:
                await lk.call("ListParticipants", {"room": room_name})
            assert ei.value.code == "not_found"
        finally:
            for r in receivers:
                await r.close()
            if tone:
                await tone.stop()
            await disconnect_all(alice, bob, carol)


@pytest.mark.timeout(60)
async def test_create_room_timeouts(arbor):
    """CreateRoom's empty_timeout and departure_timeout close the room as configured."""
    async with PythonDriver(arbor.http_url) as lk:
        await lk.call("CreateRoom", {"name": "short", "emptyTimeout": 1})
        await lk.call("CreateRoom", {"name": "long", "emptyTimeout": 60, "departureTimeout": 1})
        rooms = {r["name"] for r in (await lk.call("ListRooms", {})).get("rooms", [])}
        assert rooms == {"short", "long"}, rooms

        async def room_names() -> set:
            return {r["name"] for r in (await lk.call("ListRooms", {})).get("rooms", [])}

        deadline = asyncio.get_running_loop().time() + 10
        while "short" in await room_names():
            assert asyncio.get_running_loop().time() < deadline, "empty room was not closed"
            await asyncio.sleep(0.2)
        assert "long" in await room_names(), "the room with empty_timeout 60 closed early"
        # A participant comes and goes: departure_timeout (1 s) applies, not empty_timeout.
        room, _ = await connect(arbor.ws_url, participant_token("visitor", "long"), "visitor")
        await disconnect_all(room)
        deadline = asyncio.get_running_loop().time() + 10
        while "long" in await room_names():
            assert asyncio.get_running_loop().time() < deadline, "room not closed after departure"
            await asyncio.sleep(0.2)


def raw_twirp(
    url: str, method: str, body: bytes, *, token: Optional[str], content_type: str,
    service: str = "livekit.RoomService",
) -> tuple[int, dict, dict]:
    """POST a raw Twirp request; returns (status, JSON body, lower-cased headers)."""
    req = urllib.request.Request(f"{url}/twirp/{service}/{method}", data=body, method="POST")
    req.add_header("Content-Type", content_type)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            raw, status, headers = r.read(), r.status, r.headers
    except urllib.error.HTTPError as e:
        raw, status, headers = e.read(), e.code, e.headers
    headers = {k.lower(): v for k, v in headers.items()}
    try:
        return status, json.loads(raw or b"{}"), headers
    except ValueError:
        return status, {"raw": raw.decode(errors="replace")}, headers


def admin_token(room: str, **grants: bool) -> str:
    g = api.VideoGrants(room=room, **grants)
    return api.AccessToken(API_KEY, API_SECRET).with_identity("admin").with_grants(g).to_jwt()


@pytest.mark.timeout(120)
async def test_room_service_refusals_change_nothing(arbor):
    room_name = "guarded"
    alice = None
    try:
        alice, a_ev = await connect(arbor.ws_url, participant_token("alice", room_name), "alice")
        url = arbor.http_url
        good = admin_token(room_name, room_admin=True, room_list=True, room_create=True)
        js = "application/json"

        def participants() -> dict:
            s, body, _ = raw_twirp(url, "ListParticipants", json.dumps({"room": room_name}).encode(),
                                   token=good, content_type=js)
            assert s == 200, body
            return body

        before = participants()
        assert identities(before) == {"alice"}

        cases = [
            # (what, method, body, token, content type, expected status, expected code)
            ("no token", "RemoveParticipant", {"room": room_name, "identity": "alice"}, None, js,
             401, "unauthenticated"),
            ("bad signature", "RemoveParticipant", {"room": room_name, "identity": "alice"},
             api.AccessToken(API_KEY, "wrong").with_grants(api.VideoGrants(room_admin=True, room=room_name)).to_jwt(),
             js, 401, "unauthenticated"),
            ("roomAdmin for another room", "RemoveParticipant", {"room": room_name, "identity": "alice"},
             admin_token("other", room_admin=True), js, 403, "permission_denied"),
            ("join grant only", "UpdateParticipant", {"room": room_name, "identity": "alice", "metadata": "x"},
             admin_token(room_name, room_join=True), js, 403, "permission_denied"),
            ("no roomCreate", "DeleteRoom", {"room": room_name},
             admin_token(room_name, room_admin=True), js, 403, "permission_denied"),
            ("no roomCreate", "CreateRoom", {"name": "new-room"},
             admin_token(room_name, room_admin=True), js, 403, "permission_denied"),
            ("no roomList", "ListRooms", {}, admin_token(room_name, room_admin=True), js,
             403, "permission_denied"),
            ("unknown room", "UpdateRoomMetadata", {"room": "nope", "metadata": "x"},
             admin_token("nope", room_admin=True), js, 404, "not_found"),
            ("unknown room", "DeleteRoom", {"room": "nope"}, good, js, 404, "not_found"),
            ("unknown participant", "RemoveParticipant", {"room": room_name, "identity": "ghost"},
             good, js, 404, "not_found"),
            ("unknown track", "MutePublishedTrack",
             {"room": room_name, "identity": "alice", "trackSid": "TR_nope", "muted": True},
             good, js, 404, "not_found"),
            # snake_case field names are accepted too (the message names the track it parsed).
            ("unknown track, snake_case", "MutePublishedTrack",
             {"room": room_name, "identity": "alice", "track_sid": "TR_snake", "muted": True},
             good, js, 404, "not_found"),
            ("unknown method", "FlyToTheMoon", {"room": room_name}, good, js, 404, "bad_route"),
            ("unsupported content type", "ListParticipants", {"room": room_name}, good,
             "text/plain", 404, "bad_route"),
        ]
        for what, method, body, token, ct, status, code in cases:
            s, resp, headers = raw_twirp(url, method, json.dumps(body).encode(), token=token,
                                         content_type=ct)
            assert (s, resp.get("code")) == (status, code), f"{what}: {method} -> {s} {resp}"
            assert resp.get("msg"), f"{what}: the error must say what is wrong: {resp}"
            if "track_sid" in body:
                assert "TR_snake" in resp["msg"], resp
            assert headers.get("access-control-allow-origin") == "*", f"{what}: CORS header missing"

        # Malformed bodies, in both encodings.
        for body, ct in (
            (b"{not json", js),
            (b'{"room": 5, "identity": ["x"]}', js),
            (b"\xff\xff\xff\xff", "application/protobuf"),
        ):
            s, resp, _ = raw_twirp(url, "UpdateParticipant", body, token=good, content_type=ct)
            assert (s, resp.get("code")) == (400, "malformed"), f"{body!r}: {s} {resp}"

        # An unknown service is a bad route too.
        s, resp, _ = raw_twirp(url, "Anything", b"{}", token=good, content_type=js,
                               service="livekit.Nope")
        assert (s, resp.get("code")) == (404, "bad_route"), resp

        # Limits: oversized metadata is refused with a clear error.
        s, resp, _ = raw_twirp(url, "UpdateRoomMetadata",
                               json.dumps({"room": room_name, "metadata": "x" * 70_000}).encode(),
                               token=good, content_type=js)
        assert (s, resp.get("code")) == (429, "resource_exhausted"), resp
        assert "max_metadata_bytes" in resp["msg"], resp

        # CORS preflight.
        req = urllib.request.Request(f"{url}/twirp/livekit.RoomService/ListRooms", method="OPTIONS")
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status in (200, 204)
            assert r.headers.get("Access-Control-Allow-Origin") == "*"

        # Nothing changed: alice is still there, untouched, and no other room appeared.
        after = participants()
        assert after == before, f"a refused call changed state:\n{before}\n{after}"
        assert alice.connection_state == rtc.ConnectionState.CONN_CONNECTED
        s, rooms, _ = raw_twirp(url, "ListRooms", b"{}", token=good, content_type=js)
        assert [r["name"] for r in rooms.get("rooms", [])] == [room_name], rooms

        # The metrics endpoint counts the API calls and errors.
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
            text = r.read().decode()
        errors = [l for l in text.splitlines() if l.startswith("arbor_api_errors_total ")]
        assert errors and int(errors[0].split()[1]) >= len(cases) + 5, errors
    finally:
        await disconnect_all(alice)
