"""Issue 8: the cascading relay fabric — one room served by several nodes.

Each node is a real `arbor` process that is both an SFU and a Raft cluster member (`cluster.config`
points at the TOML `arbor cluster init` wrote). The first node a room is joined on becomes its
origin (Raft directory, origin lease); the others run it as edges linked to the origin over the
nodes' mutual-TLS QUIC connection. Python SDK clients connect to different nodes and must see one
room: participants, tracks, data packets, decoded media.

Test 1 (this file): three nodes; a publisher on A; subscribers on B and C decode A's video
counter and audio tone; data packets cross nodes in both directions, in order; the relay counters
in `/metrics` show frames going over the links.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import signal
import subprocess
import time
import urllib.request
import json
from pathlib import Path
from typing import Optional

import pytest
from livekit import rtc

from conftest import LOGS, WORK, arbor_binary, free_port
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

TONE_HZ = 440.0


@dataclasses.dataclass
class Node:
    id: int
    proc: subprocess.Popen
    host: str
    port: int
    log_path: Path

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def get(self, path: str) -> str:
        with urllib.request.urlopen(self.http_url + path, timeout=5) as r:
            return r.read().decode(errors="replace")

    def metric(self, name: str) -> float:
        for line in self.get("/metrics").splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"metric {name} missing on node {self.id}")


class Cluster:
    """N arbor nodes, each an SFU and a cluster member.

    Without `wan`, all nodes share this namespace (HTTP and QUIC on 127.0.0.1, media on
    ARBOR_NODE_IP). With `wan` (a started `wan.Wan`) node i runs inside site `sites[i]` and
    advertises that site's address; clients reach it through the emulator.
    """

    def __init__(self, name: str, n: int, wan=None, sites: Optional[list[str]] = None) -> None:
        self.name = name
        self.n = n
        self.wan = wan
        self.sites = sites or []
        self.nodes: list[Node] = []
        self.dir = WORK / f"cluster-{name}-{os.getpid()}-{int(time.time() * 1000)}"
        self.node_ip = os.environ.get("ARBOR_NODE_IP", "10.200.0.1")

    def host(self, i: int) -> str:
        return self.wan.ip(self.sites[i]) if self.wan else "127.0.0.1"

    def start(self) -> "Cluster":
        binary = str(arbor_binary())
        ports = [(free_port(), free_port(), free_port(), free_port()) for _ in range(self.n)]
        specs = []
        for i, (http, quic, _, _) in enumerate(ports):
            specs += ["--node", f"{i + 1}={self.host(i)}:{quic},{self.host(i)}:{http}"]
        subprocess.run(
            [binary, "cluster", "init", "--out", str(self.dir), "--cluster-id", "fabric-test", *specs],
            check=True,
            capture_output=True,
        )
        for i in range(self.n):
            self.launch(i, ports[i])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for node in self.nodes:
                if not node.alive():
                    raise RuntimeError(f"node {node.id} exited:\n{node.log_text()[-3000:]}")
            try:
                if all(json.loads(n.get("/cluster/status")).get("leader") for n in self.nodes):
                    return self
            except Exception:
                pass
            time.sleep(0.2)
        raise RuntimeError("cluster did not elect a leader within 60 s")

    def launch(self, i: int, ports: tuple[int, int, int, int]) -> None:
        http, _quic, udp, tcp = ports
        binary = str(arbor_binary())
        log_path = LOGS / f"{self.name}-node{i + 1}.log"
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "info")
        env.setdefault("NO_COLOR", "1")
        env["ARBOR_CLUSTER_CONFIG"] = str(self.dir / f"node-{i + 1}.toml")
        host = self.host(i)
        node_ip = host if self.wan else self.node_ip
        args = [
            binary, "--dev", "--bind", host, "--port", str(http),
            "--udp-port", str(udp), "--tcp-port", str(tcp), "--node-ip", node_ip,
        ]
        log = open(log_path, "wb")
        log.write(f"$ ARBOR_CLUSTER_CONFIG={env['ARBOR_CLUSTER_CONFIG']} {' '.join(args)}\n".encode())
        log.flush()
        if self.wan:
            proc = self.wan.popen(self.sites[i], args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=WORK)
        else:
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=WORK)
        log.close()
        self.nodes.append(Node(i + 1, proc, host, http, log_path))

    def stop(self) -> None:
        for node in self.nodes:
            if node.alive():
                node.proc.send_signal(signal.SIGTERM)
        for node in self.nodes:
            try:
                node.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait(timeout=10)

    def check_health(self) -> None:
        for node in self.nodes:
            text = node.log_text()
            assert "panicked at" not in text, f"node {node.id} panicked:\n{text[-3000:]}"


@pytest.fixture
def cluster3(request):
    c = Cluster("fabric3", 3)
    try:
        c.start()
        yield c
    finally:
        c.stop()
    c.check_health()


def is_video(track: rtc.Track) -> bool:
    return track.kind == rtc.TrackKind.KIND_VIDEO


def is_audio(track: rtc.Track) -> bool:
    return track.kind == rtc.TrackKind.KIND_AUDIO


class Subscriber:
    """A Python SDK participant that decodes alice's video counter and tone."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.room = rtc.Room()
        self.events = EventLog(self.room, label)
        self.receivers: dict[str, object] = {}
        self.data: list[tuple[str, bytes]] = []
        self.room.on("track_subscribed", self._on_track)
        self.room.on("data_received", self._on_data)

    def _on_track(self, track, pub, participant) -> None:
        if participant.identity != "alice":
            return
        if is_video(track) and "video" not in self.receivers:
            self.receivers["video"] = VideoReceiver(track)
        if is_audio(track) and "audio" not in self.receivers:
            self.receivers["audio"] = ToneReceiver(track, TONE_HZ)

    def _on_data(self, packet: rtc.DataPacket) -> None:
        who = packet.participant.identity if packet.participant else ""
        self.data.append((who, bytes(packet.data)))

    async def connect(self, url: str, identity: str, room: str) -> None:
        await asyncio.wait_for(self.room.connect(url, make_token(identity, room)), 30)


@pytest.mark.timeout(300)
async def test_three_nodes_publisher_on_a_viewers_on_b_and_c(cluster3, results):
    a_node, b_node, c_node = cluster3.nodes
    room_name = "fabric-room"
    alice = None
    bob = carol = None
    video = audio = None
    try:
        alice, alice_events = await connect(a_node.ws_url, make_token("alice", room_name), "A")
        video = CounterVideoPublisher(640, 480, 30)
        audio = TonePublisher(TONE_HZ)
        await video.publish(alice)
        await audio.publish(alice)

        bob = Subscriber("B")
        carol = Subscriber("C")
        t0 = time.monotonic()
        await bob.connect(b_node.ws_url, "bob", room_name)
        await carol.connect(c_node.ws_url, "carol", room_name)

        # Everyone sees everyone, whichever node they are on.
        await wait_until(lambda: "alice" in bob.room.remote_participants, 20, "B sees alice")
        await wait_until(lambda: "alice" in carol.room.remote_participants, 20, "C sees alice")
        await wait_until(
            lambda: {"bob", "carol"} <= set(alice.remote_participants), 20, "A sees bob and carol"
        )
        await wait_until(lambda: "carol" in bob.room.remote_participants, 20, "B sees carol")
        await wait_until(lambda: "bob" in carol.room.remote_participants, 20, "C sees bob")

        # Media relayed A -> B and A -> C, decoded.
        for sub in (bob, carol):
            await wait_until(lambda: "video" in sub.receivers, 30, f"{sub.label} subscribed to alice's video")
            vrecv = sub.receivers["video"]
            await wait_until(lambda: len(vrecv.counters()) >= 60, 60, f"60 readable frames at {sub.label}")
            counters = vrecv.counters()
            assert all(x < y for x, y in zip(counters, counters[1:])), counters[:80]
            assert counters[-1] < video.sent
            await wait_until(lambda: "audio" in sub.receivers, 30, f"{sub.label} subscribed to alice's audio")
            arecv = sub.receivers["audio"]
            await wait_until(lambda: arecv.tone_seconds >= 2.0, 30, f"2 s of tone at {sub.label}")
        first = min(bob.receivers["video"].frames[0].t, carol.receivers["video"].frames[0].t)
        results(f"fabric3: first relayed frame {first - t0:.2f} s after B's connect")

        # Data packets cross nodes, in order per sender, both directions.
        for i in range(20):
            await alice.local_participant.publish_data(f"a{i}".encode(), reliable=True)
        await carol.room.local_participant.publish_data(b"from-carol", reliable=True)
        await carol.room.local_participant.publish_data(
            b"carol-to-bob", reliable=True, destination_identities=["bob"]
        )
        expect_a = [f"a{i}".encode() for i in range(20)]
        for sub in (bob, carol):
            await wait_until(
                lambda: [d for w, d in sub.data if w == "alice"] == expect_a,
                20,
                f"{sub.label} got alice's 20 messages in order (got {sub.data[:5]})",
            )
        await wait_until(lambda: ("carol", b"from-carol") in bob.data, 20, "B got carol's message")
        await wait_until(lambda: ("carol", b"carol-to-bob") in bob.data, 20, "B got carol's direct message")
        await alice_events.wait(
            "data_received", lambda p: bytes(p.data) == b"from-carol", timeout=20
        )
        assert not alice_events.find("data_received", lambda p: bytes(p.data) == b"carol-to-bob"), (
            "a message addressed to bob reached alice"
        )

        # The relay carried it: frames out of A, frames into B and C.
        assert a_node.metric("arbor_relay_frames_sent_total") > 0
        for n in (b_node, c_node):
            assert n.metric("arbor_relay_frames_received_total") > 0

        # Bob leaves: alice and carol see it.
        await bob.room.disconnect()
        bob = None
        await alice_events.wait("participant_disconnected", lambda p: p.identity == "bob", timeout=20)
        await carol.events.wait("participant_disconnected", lambda p: p.identity == "bob", timeout=20)
    finally:
        for pub in (video, audio):
            if pub is not None:
                await pub.stop()
        await disconnect_all(alice, bob.room if bob else None, carol.room if carol else None)
