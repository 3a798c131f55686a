"""pytest fixtures for Arbor's end-to-end suite.

* `arbor` starts a real `arbor --dev` process on free ports for one test, waits for `GET /` to answer
  `OK`, and stops it afterwards. Its stderr goes to `tests/e2e/.work/logs/<test>.log`; when the test
  fails, the tail of that log is attached to the pytest report. A server that died during the test,
  or that logged a Rust panic, fails the test at teardown.
* `results` appends measured numbers (join time, CPU, RSS) to `tests/e2e/.work/results.txt`.

The suite must run inside the private network namespace set up by `tests/e2e/run` (a veth pair
10.200.0.1 <-> 10.200.0.2): LiveKit's native clients never offer loopback ICE candidates, so media
only flows on such a private link. Nothing here ever targets an address outside that namespace.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator, Optional

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
WORK = HERE / ".work"
LOGS = WORK / "logs"
RESULTS = WORK / "results.txt"

sys.path.insert(0, str(HERE))


def pytest_configure(config: pytest.Config) -> None:
    LOGS.mkdir(parents=True, exist_ok=True)


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.environ.get("ARBOR_E2E_IN_NETNS") != "1":
        pytest.exit(
            "the e2e suite must run inside its private network namespace: use tests/e2e/run "
            "(or scripts/test), e.g. `tests/e2e/run -k test_two_participants`",
            returncode=2,
        )


_exit_status = 0


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    global _exit_status
    _exit_status = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    # The LiveKit SDK's native runtime sometimes aborts while the interpreter tears down
    # ("panic in a function that cannot unwind"), which would replace pytest's exit status.
    # Everything is reported by now (junit XML, terminal summary): leave with pytest's status.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status)


def arbor_binary() -> Path:
    path = Path(os.environ.get("ARBOR_BIN") or ROOT / "target" / "debug" / "arbor")
    if not path.is_file():
        pytest.fail(f"arbor binary not found at {path}: run `cargo build` or set ARBOR_BIN")
    return path


# Ports for servers come from below the kernel's ephemeral range (32768-60999 on Linux), so the
# many UDP sockets that WebRTC clients open on random ports cannot take a server's port between
# the check here and the server's bind.
_PORT_LOW, _PORT_HIGH = 20000, 32000
_next_port = _PORT_LOW + (os.getpid() * 97) % (_PORT_HIGH - _PORT_LOW)


def free_port() -> int:
    """A port currently free for both TCP and UDP on every address of this namespace."""
    global _next_port
    for _ in range(_PORT_HIGH - _PORT_LOW):
        port = _next_port
        _next_port = _PORT_LOW + (_next_port + 1 - _PORT_LOW) % (_PORT_HIGH - _PORT_LOW)
        try:
            for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                with socket.socket(socket.AF_INET, kind) as s:
                    s.bind(("0.0.0.0", port))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port")


def free_port_range(n: int) -> int:
    """The first of `n` consecutive free ports (a sharded server's UDP ports)."""
    for _ in range(1000):
        first = free_port()
        if all(free_port() == first + k for k in range(1, n)):
            return first
    raise RuntimeError(f"no {n} consecutive free ports")


@dataclasses.dataclass
class ArborServer:
    """A running `arbor --dev` process."""

    proc: subprocess.Popen
    port: int
    udp_port: int
    tcp_port: int
    node_ip: str
    log_path: Path

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def health(self) -> str:
        with urllib.request.urlopen(self.http_url + "/", timeout=5) as r:
            return r.read().decode(errors="replace").strip()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 120) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


def start_arbor(
    name: str,
    extra_args: tuple[str, ...] = (),
    *,
    bind: str = "127.0.0.1",
    env: Optional[dict[str, str]] = None,
) -> ArborServer:
    """Starts arbor on fresh ports; retries (new ports) if a port was taken meanwhile.

    `bind` is the HTTP/WebSocket listen address: 127.0.0.1 by default; `0.0.0.0` lets clients in
    a child network namespace (reached over another veth pair) signal to `node_ip` as well.
    `env` adds environment variables (e.g. `ARBOR_RTC_SHARDS`).
    """
    for attempt in range(3):
        try:
            return _start_arbor_once(name, extra_args, bind, env or {})
        except PortTaken:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


class PortTaken(RuntimeError):
    pass


def _start_arbor_once(
    name: str, extra_args: tuple[str, ...], bind: str, extra_env: dict[str, str]
) -> ArborServer:
    binary = arbor_binary()
    node_ip = os.environ.get("ARBOR_NODE_IP", "10.200.0.1")
    port, tcp_port, udp_port = free_port(), free_port(), free_port()
    log_path = LOGS / f"{name}.log"
    env = dict(os.environ)
    env.setdefault("RUST_LOG", "info")
    env.setdefault("RUST_BACKTRACE", "1")
    env.setdefault("NO_COLOR", "1")
    env.update(extra_env)
    args = [
        str(binary),
        "--dev",
        "--bind", bind,
        "--port", str(port),
        "--udp-port", str(udp_port),
        "--tcp-port", str(tcp_port),
        "--node-ip", node_ip,
        *extra_args,
    ]
    log_file = open(log_path, "wb")
    log_file.write(f"$ {' '.join(args)}\n".encode())
    log_file.flush()
    proc = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=WORK)
    log_file.close()
    server = ArborServer(proc, port, udp_port, tcp_port, node_ip, log_path)
    deadline = time.monotonic() + 30
    last_err: Optional[Exception] = None
    while time.monotonic() < deadline:
        if not server.alive():
            if "Address already in use" in server.log_text():
                raise PortTaken(server.log_tail())
            raise RuntimeError(f"arbor exited with {proc.returncode} at start-up:\n{server.log_tail()}")
        try:
            if server.health() == "OK":
                return server
        except Exception as e:  # not listening yet
            last_err = e
        time.sleep(0.1)
    stop_arbor(server)
    raise RuntimeError(f"arbor did not answer GET / within 30 s ({last_err}):\n{server.log_tail()}")


def stop_arbor(server: ArborServer) -> None:
    if server.alive():
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(timeout=10)


def _safe_name(nodeid: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid.split("::", 1)[-1])[:100]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)
    if rep.failed:
        for server in getattr(item, "arbor_servers", []):
            rep.sections.append(
                (f"arbor server log ({server.log_path}, last 120 lines)", server.log_tail())
            )


def serve_arbor(request: pytest.FixtureRequest, **kwargs) -> Iterator[ArborServer]:
    """Body of a server fixture: a fresh `arbor` (`start_arbor` arguments in `kwargs`) for this
    test, stopped afterwards; its log is attached on failure, and the test fails if the
    server died or logged a panic."""
    server = start_arbor(_safe_name(request.node.nodeid), **kwargs)
    request.node.arbor_servers = [server]
    yield server
    died = not server.alive()
    returncode = server.proc.returncode
    stop_arbor(server)
    text = server.log_text()
    if died:
        pytest.fail(f"arbor died during the test (exit code {returncode})", pytrace=False)
    if "panicked at" in text:
        pytest.fail("arbor logged a Rust panic during the test", pytrace=False)


@pytest.fixture
def arbor(request: pytest.FixtureRequest) -> Iterator[ArborServer]:
    """A fresh `arbor --dev` for this test, stopped afterwards; its log is attached on failure."""
    yield from serve_arbor(request)


@pytest.fixture
def results():
    """`results(line)` prints a measurement and appends it to tests/e2e/.work/results.txt."""

    def record(line: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        text = f"{stamp} {line}"
        print(f"RESULT: {text}")
        with open(RESULTS, "a") as f:
            f.write(text + "\n")

    return record
