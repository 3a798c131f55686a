"""Issue 2, acceptance item 1: two Python SDK participants exchange media, mute state and data.

A publishes a 640x480 video track whose frames carry a counter and a 48 kHz 440 Hz tone. B joins
afterwards and must decode the counter (increasing, never ahead of what A sent), hear the tone, see
A's mute and unmute, receive reliable and lossy data with A's identity, and see A leave. A third
participant C proves that a message addressed to C alone is not delivered to B. The time from B's
`connect()` to B's first decoded frame of A's video is recorded as the join time.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from livekit import rtc

from helpers import (
    CounterVideoPublisher,
    EventLog,
    ToneReceiver,
    TonePublisher,
    VideoReceiver,
    connect,
    disconnect_all,
    make_token,
    wait_until,
)

ROOM = "media-room"
TONE_HZ = 440.0


def is_video(track: rtc.Track) -> bool:
    return track.kind == rtc.TrackKind.KIND_VIDEO


def is_audio(track: rtc.Track) -> bool:
    return track.kind == rtc.TrackKind.KIND_AUDIO


@pytest.mark.timeout(240)
async def test_two_participants_media_mute_data_leave(arbor, results):
    a = b = c = None
    video = audio = None
    vrecv = arecv = None
    try:
        # --- A joins and publishes video + audio -------------------------------------------
        a, a_events = await connect(arbor.ws_url, make_token("alice", ROOM), "A")
        video = CounterVideoPublisher(640, 480, 30)
        audio = TonePublisher(TONE_HZ)
        vpub = await video.publish(a)
        apub = await audio.publish(a)
        assert vpub.sid.startswith("TR_"), f"video track sid {vpub.sid!r} should start with TR_"
        assert apub.sid.startswith("TR_"), f"audio track sid {apub.sid!r} should start with TR_"

        # --- B joins; join time = connect() start -> first decoded video frame -------------
        b_room = rtc.Room()

        b_events = EventLog(b_room, "B")
        receivers: dict[str, object] = {}

        def on_subscribed(track, pub, participant):
            if participant.identity != "alice":
                return
            if is_video(track) and "video" not in receivers:
                receivers["video"] = VideoReceiver(track)
            if is_audio(track) and "audio" not in receivers:
                receivers["audio"] = ToneReceiver(track, TONE_HZ)

        b_room.on("track_subscribed", on_subscribed)
        t_connect = time.monotonic()
        await asyncio.wait_for(b_room.connect(arbor.ws_url, make_token("bob", ROOM)), 30)
        b = b_room
        t_connected = time.monotonic()
        assert "alice" in b.remote_participants, "B should see A in the room after connect()"

        await wait_until(lambda: "video" in receivers, 30, "B subscribed to A's video")
        vrecv = receivers["video"]
        await wait_until(lambda: vrecv.frames, 30, "B's first decoded video frame from A")
        join_time = vrecv.frames[0].t - t_connect
        results(
            f"join_time_s={join_time:.3f} (B connect() start -> first decoded remote frame; "
            f"signal connect {t_connected - t_connect:.3f} s)"
        )

        # --- video: >= 60 decoded frames carrying A's counter ------------------------------
        await wait_until(lambda: len(vrecv.counters()) >= 60, 60, "60 readable frames at B")
        counters = vrecv.counters()
        readable = len(counters)
        total = len(vrecv.frames)
        assert readable >= 0.9 * total, f"only {readable} of {total} decoded frames were readable"
        assert all(x < y for x, y in zip(counters, counters[1:])), (
            f"decoded counters must increase strictly: {counters[:80]}"
        )
        assert counters[-1] < video.sent, f"B decoded counter {counters[-1]} but A only sent {video.sent}"
        sizes = {(f.width, f.height) for f in vrecv.frames}
        assert (640, 480) in sizes, f"B should decode A's 640x480 picture, got sizes {sizes}"

        # --- audio: >= 2 s of the 440 Hz tone ----------------------------------------------
        await wait_until(lambda: "audio" in receivers, 30, "B subscribed to A's audio")
        arecv = receivers["audio"]
        await wait_until(
            lambda: arecv.tone_seconds >= 2.0,
            30,
            "2 s of A's 440 Hz tone at B",
        )
        assert arecv.samples_received >= 2 * 48000

        # --- mute and unmute ----------------------------------------------------------------
        video.track.mute()
        await b_events.wait(
            "track_muted", lambda p, pub: p.identity == "alice" and pub.sid == vpub.sid, timeout=20
        )
        video.track.unmute()
        await b_events.wait(
            "track_unmuted", lambda p, pub: p.identity == "alice" and pub.sid == vpub.sid, timeout=20
        )

        # --- data: reliable, lossy, and targeted (C proves non-delivery) -------------------
        c, c_events = await connect(arbor.ws_url, make_token("carol", ROOM), "C")
        await b_events.wait("participant_connected", lambda p: p.identity == "carol", timeout=20)
        await a_events.wait("participant_connected", lambda p: p.identity == "carol", timeout=20)

        def data_from(payload: bytes, sender: str):
            return lambda pkt: pkt.data == payload and pkt.participant is not None and pkt.participant.identity == sender

        await a.local_participant.publish_data(b"reliable-hello", reliable=True, topic="chat")
        ev = await b_events.wait("data_received", data_from(b"reliable-hello", "alice"), timeout=20)
        assert ev.args[0].kind == rtc.DataPacketKind.KIND_RELIABLE
        assert ev.args[0].topic == "chat"

        # Lossy data may legitimately be dropped, so send a few copies; at least one must arrive.
        for _ in range(5):
            await a.local_participant.publish_data(b"lossy-hello", reliable=False)
            await asyncio.sleep(0.2)
        ev = await b_events.wait("data_received", data_from(b"lossy-hello", "alice"), timeout=20)
        assert ev.args[0].kind == rtc.DataPacketKind.KIND_LOSSY

        await a.local_participant.publish_data(
            b"only-for-carol", reliable=True, destination_identities=["carol"]
        )
        await c_events.wait("data_received", data_from(b"only-for-carol", "alice"), timeout=20)
        # A reliable, ordered message sent after the targeted one: once B has it, B would have
        # received the targeted message already if the server had (wrongly) broadcast it.
        await a.local_participant.publish_data(b"after-targeted", reliable=True)
        await b_events.wait("data_received", data_from(b"after-targeted", "alice"), timeout=20)
        await asyncio.sleep(1.0)
        leaked = b_events.find("data_received", lambda pkt: pkt.data == b"only-for-carol")
        assert not leaked, "a message addressed to carol only was delivered to bob"
        # And the reverse direction: B's message to A is not seen by C.
        await b.local_participant.publish_data(
            b"only-for-alice", reliable=True, destination_identities=["alice"]
        )
        await a_events.wait("data_received", data_from(b"only-for-alice", "bob"), timeout=20)
        await b.local_participant.publish_data(b"bob-broadcast", reliable=True)
        await c_events.wait("data_received", data_from(b"bob-broadcast", "bob"), timeout=20)
        await asyncio.sleep(1.0)
        assert not c_events.find("data_received", lambda pkt: pkt.data == b"only-for-alice"), (
            "a message addressed to alice only was delivered to carol"
        )

        # --- A leaves ------------------------------------------------------------------------
        await video.stop()
        await audio.stop()
        await asyncio.wait_for(a.disconnect(), 10)
        a = None
        ev = await b_events.wait("participant_disconnected", lambda p: p.identity == "alice", timeout=20)
        reason = ev.args[0].disconnect_reason
        # A clean `disconnect()` sends LeaveRequest{CLIENT_INITIATED}; the others must learn that
        # alice left on purpose, not that she timed out.
        assert reason == rtc.DisconnectReason.CLIENT_INITIATED, (
            f"B saw alice leave with reason {rtc.DisconnectReason.Name(reason) if reason else reason}, "
            f"expected CLIENT_INITIATED"
        )
        await b_events.wait(
            "track_unsubscribed",
            lambda track, pub, p: p.identity == "alice" and pub.sid == vpub.sid,
            timeout=20,
        )
        await b_events.wait(
            "track_unsubscribed",
            lambda track, pub, p: p.identity == "alice" and pub.sid == apub.sid,
            timeout=20,
        )
        assert "alice" not in b.remote_participants
    finally:
        for r in (vrecv, arecv):
            if r is not None:
                await r.close()
        for p in (video, audio):
            if p is not None:
                await p.stop()
        await disconnect_all(a, b, c)
