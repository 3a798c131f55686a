"""Issue 3, acceptance item 4: configuration errors stop the server at start, naming the key.

Also shows a server configured purely from ARBOR_* environment variables (keys included) and one
whose keys come from a `key_file`, each answering the server API with exactly those keys.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from livekit import api

from conftest import WORK, arbor_binary, free_port

# The harness environment minus any ARBOR_* configuration and RUST_LOG (which would override
# logging.level).
BASE_ENV = {
    k: v
    for k, v in os.environ.items()
    if k != "RUST_LOG" and (not k.startswith("ARBOR_") or k in ("ARBOR_BIN", "ARBOR_NODE_IP", "ARBOR_E2E_IN_NETNS"))
}


def run_arbor(args: list[str], env: dict[str, str], timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(arbor_binary()), *args], env={**BASE_ENV, **env}, capture_output=True, text=True,
        timeout=timeout, cwd=WORK,
    )


def write(name: str, text: str) -> Path:
    p = WORK / name
    p.write_text(text)
    return p


CASES = [
    # (name, config text or None, extra env, words the error must contain)
    ("bad port", "port: 70000\nkeys: {k: s}\n", {}, ["port"]),
    ("zero port", "port: 0\nkeys: {k: s}\n", {}, ["`port`"]),
    ("udp equals tcp", "keys: {k: s}\nrtc: {udp_port: 9000, tcp_port: 9000}\n", {}, ["rtc.tcp_port"]),
    ("too many shards", "keys: {k: s}\nrtc: {shards: 65}\n", {}, ["rtc.shards"]),
    ("shard ports reach tcp", "keys: {k: s}\nrtc: {udp_port: 9000, tcp_port: 9001}\n",
     {"ARBOR_RTC_SHARDS": "2"}, ["rtc.tcp_port", "9000-9001"]),
    ("missing secret", "keys:\n  mykey: \"\"\n", {}, ["keys", "missing secret", "mykey"]),
    ("no keys", "port: 7880\n", {}, ["keys"]),
    ("unknown key", "port: 7880\nkeys: {k: s}\nbogus: 1\n", {}, ["bogus"]),
    ("unknown nested key", "keys: {k: s}\nrtc:\n  udp_prot: 1\n", {}, ["udp_prot"]),
    ("bad log level", "keys: {k: s}\nlogging: {level: loud}\n", {}, ["logging.level", "loud"]),
    ("https webhook", "keys: {k: s}\nwebhook: {urls: ['https://example.invalid/hook']}\n", {},
     ["webhook.urls"]),
    ("webhook key unknown", "keys: {k: s}\nwebhook: {urls: ['http://127.0.0.1:9/h'], api_key: zz}\n", {},
     ["webhook.api_key"]),
    ("missing key_file", "key_file: /nonexistent/keys.yaml\n", {}, ["key_file", "/nonexistent/keys.yaml"]),
    ("env bad number", "keys: {k: s}\n", {"ARBOR_PORT": "abc"}, ["ARBOR_PORT", "port"]),
    ("env out of range", "keys: {k: s}\n", {"ARBOR_RTC_UDP_PORT": "70000"}, ["ARBOR_RTC_UDP_PORT"]),
    ("env unknown variable", "keys: {k: s}\n", {"ARBOR_PROT": "7880"}, ["ARBOR_PROT"]),
    ("env bad keys", None, {"ARBOR_KEYS": "no-colon-here"}, ["ARBOR_KEYS"]),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name,text,env,words", CASES, ids=[c[0] for c in CASES])
def test_invalid_config_fails_at_start_naming_the_key(name, text, env, words):
    args = []
    if text is not None:
        args = ["--config", str(write(f"bad-{name.replace(' ', '-')}.yaml", text))]
    t0 = time.monotonic()
    r = run_arbor(args, env)
    took = time.monotonic() - t0
    assert r.returncode != 0, f"{name}: arbor started with an invalid configuration:\n{r.stderr}"
    assert "panicked" not in r.stderr, r.stderr
    for w in words:
        assert w in r.stderr, f"{name}: the error does not mention {w!r}:\n{r.stderr}"
    assert took < 10, f"{name}: took {took:.1f} s to fail"


def wait_health(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"arbor exited: {proc.stderr.read() if proc.stderr else ''}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                if r.read().decode().strip() == "OK":
                    return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("arbor did not become healthy")


def list_rooms(port: int, key: str, secret: str) -> int:
    token = api.AccessToken(key, secret).with_grants(api.VideoGrants(room_list=True)).to_jwt()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/twirp/livekit.RoomService/ListRooms", data=b"{}", method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.timeout(120)
@pytest.mark.parametrize("source", ["env", "key_file"])
def test_keys_from_environment_or_key_file(source):
    port, udp, tcp = free_port(), free_port(), free_port()
    env = {
        "ARBOR_PORT": str(port),
        "ARBOR_RTC_UDP_PORT": str(udp),
        "ARBOR_RTC_TCP_PORT": str(tcp),
        "ARBOR_RTC_NODE_IP": "10.200.0.1",
        "ARBOR_LOGGING_LEVEL": "warn",
    }
    args: list[str] = []
    if source == "env":
        env["ARBOR_KEYS"] = "k1: s1, k2: s2"
    else:
        keys = write("keys.yaml", "# test keys\nk1: s1\nk2: s2\n")
        args = ["--config", str(write("with-key-file.yaml", f"key_file: {keys}\n"))]
    log = open(WORK / f"logs/config-{source}.log", "w")
    proc = subprocess.Popen([str(arbor_binary()), *args], env={**BASE_ENV, **env},
                            stdout=log, stderr=subprocess.STDOUT, cwd=WORK)
    try:
        wait_health(port, proc)
        assert list_rooms(port, "k1", "s1") == 200
        assert list_rooms(port, "k2", "s2") == 200
        assert list_rooms(port, "devkey", "secret") == 401, "keys not configured must be refused"
        assert list_rooms(port, "k1", "wrong") == 401
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()
    text = (WORK / f"logs/config-{source}.log").read_text()
    assert "panicked" not in text
    assert "INFO" not in text, "ARBOR_LOGGING_LEVEL=warn was not applied"
