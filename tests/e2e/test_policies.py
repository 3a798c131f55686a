"""Issue 4, room policies (off by default): audio-only participants beyond a threshold, and
last-N (only the video of the N most recent speakers is forwarded).

Each test starts its own server with a config file: server-wide defaults (`room.last_n`,
`room.audio_only_after`), or named per-room sets (`room.presets`) that `CreateRoom.room_preset`
selects.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from livekit import rtc

from conftest import WORK, start_arbor, stop_arbor
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


def server_with(name: str, yaml: str):
    path = WORK / f"{name}.yaml"
    path.write_text("keys:\n  devkey: secret\n" + yaml)
    return start_arbor(name, ("--config", str(path)))


def collect(room: rtc.Room, publisher: str, receivers: dict) -> None:
    def on_subscribed(track, pub, participant):
        if participant.identity != publisher:
            return
        if track.kind == rtc.TrackKind.KIND_VIDEO and "video" not in receivers:
            receivers["video"] = VideoReceiver(track)
        if track.kind == rtc.TrackKind.KIND_AUDIO and "audio" not in receivers:
            receivers["audio"] = ToneReceiver(track, 440.0)

    room.on("track_subscribed", on_subscribed)


@pytest.mark.timeout(180)
async def test_audio_only_after_threshold():
    server = server_with("policy_audio_only", "room:\n  audio_only_after: 2\n")
    rooms = []
    pubs = []
    recv_b: dict = {}
    recv_c: dict = {}
    try:
        a, _ = await connect(server.ws_url, make_token("alice", "policy-room"), "A")
        rooms.append(a)
        video, audio = CounterVideoPublisher(320, 240, 15), TonePublisher(440.0)
        pubs += [video, audio]
        await video.publish(a)
        await audio.publish(a)
        # B is the second participant (within the threshold), C the third (audio only).
        for ident, store in (("bob", recv_b), ("carol", recv_c)):
            room = rtc.Room()
            collect(room, "alice", store)
            await asyncio.wait_for(
                room.connect(server.ws_url, make_token(ident, "policy-room")), 30
            )
            rooms.append(room)
        await wait_until(lambda: "video" in recv_b and len(recv_b["video"].frames) >= 20, 40, "B decodes video")
        await wait_until(lambda: "audio" in recv_c and recv_c["audio"].tone_seconds >= 1.0, 40, "C hears audio")
        # C is subscribed to the video track, but nothing of it is forwarded.
        await asyncio.sleep(4)
        c_frames = len(recv_c["video"].frames) if "video" in recv_c else 0
        assert c_frames == 0, f"audio-only participant C decoded {c_frames} video frames"
        assert len(recv_b["video"].frames) >= 40, "B keeps receiving video"
    finally:
        for r in list(recv_b.values()) + list(recv_c.values()):
            await r.close()
        for p in pubs:
            await p.stop()
        await disconnect_all(*rooms)
        text = server.log_text()
        stop_arbor(server)
        assert "panicked at" not in text


@pytest.mark.timeout(180)
async def test_last_n_forwards_only_recent_speakers():
    server = server_with("policy_last_n", "room:\n  last_n: 1\n")
    rooms = []
    pubs = []
    recv: dict = {"alice": {}, "bob": {}}
    try:
        # Alice joins first and stays silent; Bob speaks (a tone) — with last-N = 1 only
        # Bob's video is forwarded once he is the most recent speaker.
        a, _ = await connect(server.ws_url, make_token("alice", "lastn-room"), "A")
        b, _ = await connect(server.ws_url, make_token("bob", "lastn-room"), "B")
        rooms += [a, b]
        va = CounterVideoPublisher(320, 240, 15)
        vb = CounterVideoPublisher(320, 240, 15, base=5000)
        tb = TonePublisher(440.0)
        pubs += [va, vb, tb]
        await va.publish(a)
        await vb.publish(b)
        watcher = rtc.Room()
        collect(watcher, "alice", recv["alice"])
        collect(watcher, "bob", recv["bob"])
        await asyncio.wait_for(watcher.connect(server.ws_url, make_token("watcher", "lastn-room")), 30)
        rooms.append(watcher)
        # Before anyone speaks the earliest joiner (alice) holds the one place.
        await wait_until(lambda: "video" in recv["alice"] and len(recv["alice"]["video"].frames) >= 10, 40, "alice's video at first")
        await tb.publish(b)
        t0 = time.monotonic()
        await wait_until(lambda: "video" in recv["bob"] and len(recv["bob"]["video"].frames) >= 10, 40, "bob's video once he speaks")
        switch_s = time.monotonic() - t0
        await asyncio.sleep(2)
        n_alice = len(recv["alice"]["video"].frames)
        await asyncio.sleep(3)
        assert len(recv["alice"]["video"].frames) - n_alice <= 2, "alice's video must stop while bob is the last speaker"
        print(f"RESULT: last-N switched to the speaker's video in {switch_s:.1f} s")
    finally:
        for d in recv.values():
            for r in d.values():
                await r.close()
        for p in pubs:
            await p.stop()
        await disconnect_all(*rooms)
        text = server.log_text()
        stop_arbor(server)
        assert "panicked at" not in text


@pytest.mark.timeout(240)
async def test_policy_per_room_from_create_room_preset():
    """Per room: `room.presets` names policy sets, and a room created with the server API's
    `CreateRoom { room_preset }` uses its set. On the same server a room created without a
    preset has the server defaults (here: every policy off), so its third participant gets
    video; the preset room's third participant gets audio only. An unknown preset is refused."""
    from livekit import api

    server = server_with(
        "policy_presets", "room:\n  presets:\n    webinar: \"audio_only_after=2\"\n"
    )
    rooms = []
    pubs = []
    got: dict = {}
    try:
        lk = api.LiveKitAPI(server.http_url, "devkey", "secret", failover=False)
        try:
            await lk.room.create_room(api.CreateRoomRequest(name="with-preset", room_preset="webinar"))
            await lk.room.create_room(api.CreateRoomRequest(name="no-preset"))
            with pytest.raises(api.TwirpError) as refused:
                await lk.room.create_room(api.CreateRoomRequest(name="x", room_preset="nope"))
            assert refused.value.code == "invalid_argument" and "nope" in refused.value.message, refused.value
            names = {r.name for r in (await lk.room.list_rooms(api.ListRoomsRequest())).rooms}
            assert "x" not in names, f"a refused CreateRoom created the room: {names}"
        finally:
            await lk.aclose()

        for room_name in ("with-preset", "no-preset"):
            a, _ = await connect(server.ws_url, make_token("alice", room_name), "A")
            rooms.append(a)
            video, audio = CounterVideoPublisher(320, 240, 15), TonePublisher(440.0)
            pubs += [video, audio]
            await video.publish(a)
            await audio.publish(a)
            for ident in ("bob", "carol"):
                store: dict = {}
                got[(room_name, ident)] = store
                room = rtc.Room()
                collect(room, "alice", store)
                await asyncio.wait_for(room.connect(server.ws_url, make_token(ident, room_name)), 30)
                rooms.append(room)

        def frames(room_name: str, ident: str) -> int:
            store = got[(room_name, ident)]
            return len(store["video"].frames) if "video" in store else 0

        await wait_until(lambda: frames("with-preset", "bob") >= 20, 40, "bob decodes video in the preset room")
        await wait_until(lambda: frames("no-preset", "carol") >= 20, 40, "carol decodes video in the room without preset")
        await wait_until(
            lambda: "audio" in got[("with-preset", "carol")] and got[("with-preset", "carol")]["audio"].tone_seconds >= 1.0,
            40, "carol hears audio in the preset room",
        )
        await asyncio.sleep(3)
        assert frames("with-preset", "carol") == 0, (
            f"third participant of the preset room decoded {frames('with-preset', 'carol')} video frames"
        )
        print(
            f"RESULT: policies per room (CreateRoom room_preset): preset room 3rd participant 0 video frames, "
            f"2nd {frames('with-preset', 'bob')}; room without preset 3rd participant {frames('no-preset', 'carol')} frames"
        )
    finally:
        for store in got.values():
            for r in store.values():
                await r.close()
        for p in pubs:
            await p.stop()
        await disconnect_all(*rooms)
        text = server.log_text()
        stop_arbor(server)
        assert "panicked at" not in text
