"""Issue 5: the media engine sharded across cores (`rtc.shards`).

A server with two media shards (`ARBOR_RTC_SHARDS=2`: two engine threads, UDP ports
udp_port and udp_port + 1) runs two rooms whose names hash to different shards ("shard-b" to
shard 0, "shard-a" to shard 1; `arbor_actors::media::shard::room_tag`). In each room two Python
SDK participants publish a counter video track and decode each other's, so media flows both
ways in both rooms at once. The per-shard metrics prove the placement: each shard holds the
four peer connections of its room and reads its datagrams.

With UDP to both media ports dropped (an nftables rule in the test namespace), the clients of a
room on shard 1 fall back to ICE-TCP: the node's single TCP listener must hand their connections
to shard 1 by the ufrag prefix, and media must flow both ways.
"""

from __future__ import annotations

import asyncio

import pytest
from livekit import rtc

from conftest import serve_arbor
from helpers import (
    CounterVideoPublisher,
    VideoReceiver,
    connect,
    disconnect_all,
    make_token,
    server_metrics,
    wait_until,
)

# FNV-1a room tags: "shard-b" -> 0xd822 (even: shard 0), "shard-a" -> 0xda1b (odd: shard 1).
ROOMS = {"shard-b": 0, "shard-a": 1}


@pytest.fixture
def arbor2(request: pytest.FixtureRequest):
    """`arbor --dev` with two media shards."""
    yield from serve_arbor(request, env={"ARBOR_RTC_SHARDS": "2"})


def shard_sample(m: dict, name: str, shard: int) -> float:
    return m.get(f'{name}{{shard="{shard}"}}', -1.0)


async def join_pair(url: str, room: str):
    """Two participants in `room`, each publishing a counter track and decoding the other's."""
    rooms, pubs, logs = [], [], {}
    for i, who in enumerate(("p0", "p1")):
        r, events = await connect(url, make_token(who, room), f"{room}/{who}")
        # Different counter ranges per publisher, so each side proves it decodes the other.
        v = CounterVideoPublisher(320, 240, 20, base=i << 12)
        await v.publish(r)
        rooms.append(r)
        pubs.append(v)
        logs[who] = events
    recvs = {}
    for who, other in (("p0", "p1"), ("p1", "p0")):
        ev = await logs[who].wait(
            "track_subscribed",
            lambda track, pub, p, other=other: p.identity == other
            and track.kind == rtc.TrackKind.KIND_VIDEO,
            timeout=30,
        )
        recvs[who] = VideoReceiver(ev.args[0])
    return rooms, pubs, recvs


@pytest.mark.timeout(240)
async def test_two_rooms_on_two_shards_carry_media_both_ways(arbor2, results):
    all_rooms, all_pubs, all_recvs = [], [], []
    try:
        m0 = server_metrics(arbor2)
        assert shard_sample(m0, "arbor_media_shard_peers", 1) == 0, "the server runs two shards"
        assert shard_sample(m0, "arbor_media_shard_peers", 2) == -1, "and only two"

        per_room = {}
        for room in ROOMS:
            rooms, pubs, recvs = await join_pair(arbor2.ws_url, room)
            all_rooms += rooms
            all_pubs += pubs
            per_room[room] = (rooms, pubs, recvs)
        all_recvs = [rv for _, _, recvs in per_room.values() for rv in recvs.values()]

        # Media both ways in both rooms: each participant decodes 40 readable frames of the
        # other's counter (p0 sends 0.., p1 sends 4096..).
        for room, (rooms, pubs, recvs) in per_room.items():
            for who, other_base in (("p0", 1 << 12), ("p1", 0)):
                rv = recvs[who]
                await wait_until(
                    lambda: len(rv.counters()) >= 40, 60, f"{room}: 40 readable frames at {who}"
                )
                cs = rv.counters()
                assert all(other_base <= c < other_base + 4096 for c in cs), (
                    f"{room}: {who} decoded counters of the wrong publisher: {cs[:20]}"
                )
                assert all(x < y for x, y in zip(cs, cs[1:])), f"{room}: counters go back at {who}"

        # Placement: each shard holds its room's four peer connections (two per participant)
        # and reads that room's datagrams.
        m = server_metrics(arbor2)
        for room, shard in ROOMS.items():
            peers = shard_sample(m, "arbor_media_shard_peers", shard)
            rx = shard_sample(m, "arbor_media_shard_datagrams_received_total", shard)
            cpu = shard_sample(m, "arbor_media_shard_cpu_seconds_total", shard)
            assert peers == 4, f"shard {shard} ({room}) has {peers} peers, expected 4"
            assert rx > 100, f"shard {shard} ({room}) read only {rx} datagrams"
            assert cpu > 0, f"shard {shard} ({room}) reports no CPU time"
            results(
                f"shards=2: room {room} on shard {shard}: {peers:.0f} peers, {rx:.0f} datagrams "
                f"read, {cpu:.2f} s CPU"
            )
        frames = {
            f"{room}/{who}": len(rv.counters())
            for room, (_, _, recvs) in per_room.items()
            for who, rv in recvs.items()
        }
        results(f"shards=2: readable frames decoded per participant {frames}")
    finally:
        for rv in all_recvs:
            await rv.close()
        for p in all_pubs:
            await p.stop()
        await disconnect_all(*all_rooms)


@pytest.mark.timeout(180)
async def test_ice_tcp_reaches_the_rooms_shard(arbor2, results):
    """With UDP to the media ports dropped (nftables, this namespace only), the clients fall back
    to ICE-TCP: the node's one TCP listener must hand each connection to shard 1, where room
    "shard-a" lives (its ufrags start with "01"), and media must still flow both ways."""
    import subprocess

    table = f"arbor_tcp_only_{arbor2.udp_port}"
    ports = f"{arbor2.udp_port}, {arbor2.udp_port + 1}"
    ruleset = (
        f"table inet {table} {{\n"
        f"  chain out {{ type filter hook output priority 0; udp dport {{ {ports} }} drop; }}\n"
        f"}}\n"
    )
    r = subprocess.run(["nft", "-f", "-"], input=ruleset, capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, f"nft failed: {r.stderr}"
    rooms, pubs, recvs = [], [], {}
    try:
        rooms, pubs, recvs = await join_pair(arbor2.ws_url, "shard-a")
        for who in ("p0", "p1"):
            rv = recvs[who]
            await wait_until(lambda: len(rv.counters()) >= 30, 60, f"30 readable frames at {who}")
        m = server_metrics(arbor2)
        peers = [shard_sample(m, "arbor_media_shard_peers", s) for s in (0, 1)]
        udp = [shard_sample(m, "arbor_media_shard_datagrams_received_total", s) for s in (0, 1)]
        assert peers == [0, 4], f"peers per shard {peers}"
        assert udp == [0, 0], f"UDP datagrams per shard {udp}: media should have used ICE-TCP"
        results(
            f"shards=2, UDP blocked: room shard-a on shard 1 over ICE-TCP, readable frames "
            f"{ {w: len(rv.counters()) for w, rv in recvs.items()} }"
        )
    finally:
        for rv in recvs.values():
            await rv.close()
        for p in pubs:
            await p.stop()
        await disconnect_all(*rooms)
        subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True, timeout=20)
