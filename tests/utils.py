"""Test helpers: real backend processes and a real `balancer` process, on ephemeral ports,
and the clients the test modules share to talk to them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

HERE = Path(__file__).parent
BACKEND_SCRIPT = HERE / "backend.py"
START_TIMEOUT = 15.0
LISTENING = re.compile(r"listening on (\S+):(\d+) \((.+) -> upstream")
# Log lines that mean something went wrong inside the balancer, whatever the test did.
UNEXPECTED_LOG = re.compile(r"Traceback|ERROR asyncio|exception was never retrieved")
LOG_RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")  # a log record's first line


def _read_listening_line(proc: subprocess.Popen[str], what: str) -> int:
    """Read the child's first stdout line `listening <port>` (bounded by START_TIMEOUT)."""
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(START_TIMEOUT)
    if not result or not result[0].startswith("listening "):
        proc.kill()
        proc.wait(5)
        if proc.stdout is not None:  # the caller never sees this process: close it here
            proc.stdout.close()
        raise RuntimeError(f"{what} did not start: {result!r}")
    return int(result[0].split()[1])


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10.0,
                 close_pipes: bool = True) -> int:
    """SIGTERM, wait, then SIGKILL: no test leaves a process behind."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    if close_pipes:
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    return proc.returncode


class Backend:
    """A test backend process (see tests/backend.py for the modes)."""

    def __init__(self, mode: str, name: str = "backend", *extra: str, port: int = 0) -> None:
        self.mode = mode
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, str(BACKEND_SCRIPT), mode, "--port", str(port), "--name", name,
             *extra],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.port = _read_listening_line(self.proc, f"backend {name}")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop_process(self.proc)


class NodeBackend(Backend):
    """The demo's Node.js HTTP app (balancer/demo/app.js) as a backend."""

    def __init__(self, name: str, port: int = 0) -> None:
        app = HERE.parent / "balancer" / "demo" / "app.js"
        self.mode = "node"
        self.name = name
        self.proc = subprocess.Popen(
            ["node", str(app), "--port", str(port), "--name", name],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.port = _read_listening_line(self.proc, f"node backend {name}")


def free_port() -> int:
    """A port that nothing listens on right now (a refusing server, until we start one)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def make_config(servers: list[str], strategy: str = "round_robin", **upstream: Any) -> dict:
    """A one-listener, one-upstream config on an ephemeral port, as a plain dict."""
    up: dict[str, Any] = {"strategy": strategy, "servers": servers}
    up.update(upstream)
    return {
        "listeners": [{"name": "test", "bind": "127.0.0.1:0", "upstream": "app"}],
        "upstreams": {"app": up},
    }


class BalancerProcess:
    """The real `balancer -c FILE` command, started in its own session."""

    def __init__(self, config: dict, tmp_path: Path, *args: str, loop: str = "uvloop",
                 expect_log: list[str] | tuple[str, ...] = (),
                 nofile: int | None = None, config_file: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.expect_log = [re.compile(pattern) for pattern in expect_log]
        # `nofile`: run under that file-descriptor limit (soft and hard), as `prlimit` does.
        limit = ["prlimit", f"--nofile={nofile}:{nofile}", "--"] if nofile else []
        # `config_file`: a file (or symlink) the test laid out itself, holding `config`.
        self.config_path = config_file or tmp_path / f"balancer-{time.monotonic_ns()}.yaml"
        if config_file is None:
            self.config_path.write_text(yaml.safe_dump(config))
        self.lines: list[str] = []
        self._lines_changed = threading.Condition()
        self.proc = subprocess.Popen(
            [*limit, sys.executable, "-m", "balancer", "-c", str(self.config_path),
             "--loop", loop, *args],
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            env=None if env is None else {**os.environ, **env},
        )
        self._pump = threading.Thread(target=self._pump_stderr, daemon=True)
        self._pump.start()
        self.ports: dict[str, int] = {}
        expected = len(config["listeners"])
        self.wait_for_log(lambda: len(self._listening()) >= expected, START_TIMEOUT)
        self.ports = self._listening()

    def _pump_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._lines_changed:
                self.lines.append(line.rstrip("\n"))
                self._lines_changed.notify_all()

    def _listening(self) -> dict[str, int]:
        found = {}
        for line in list(self.lines):
            match = LISTENING.search(line)
            if match:
                found[match.group(3)] = int(match.group(2))
        return found

    def wait_for_log(self, predicate: Any, timeout: float) -> None:
        """Wait until `predicate()` holds over the collected log lines (or raise)."""
        deadline = time.monotonic() + timeout
        with self._lines_changed:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not predicate()):
                    log = "\n".join(self.lines[-30:])
                    raise AssertionError(f"balancer log condition not met; log:\n{log}")
                self._lines_changed.wait(min(remaining, 0.2))

    def wait_for_line(self, pattern: str, timeout: float = 10.0) -> str:
        regex = re.compile(pattern)
        self.wait_for_log(lambda: any(regex.search(x) for x in self.lines), timeout)
        return next(x for x in self.lines if regex.search(x))

    @property
    def port(self) -> int:
        return next(iter(self.ports.values()))

    def unexpected_log(self) -> list[str]:
        """Error lines in the log that the test did not declare with `expect_log`. A traceback
        belongs to the log record it follows: it is expected when that record is."""
        bad = []
        expected_record = False
        for line in self.lines:
            if LOG_RECORD.match(line):
                expected_record = any(pattern.search(line) for pattern in self.expect_log)
            if UNEXPECTED_LOG.search(line) and not expected_record:
                bad.append(line)
        return bad

    def check_log(self) -> None:
        """Fail on an error the balancer logged that the test did not expect."""
        bad = self.unexpected_log()
        if bad:
            raise AssertionError("unexpected errors in the balancer's log:\n" + "\n".join(bad[:20]))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def status_kib(self, field: str) -> int:
        """A /proc/PID/status field in KiB, e.g. VmRSS or VmHWM (peak RSS)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    def send_signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self) -> int:
        """Stop the balancer, and let the log reader reach the end of stderr before the pipe
        is closed: closing it under the reader raised an error in the reader's thread."""
        code = stop_process(self.proc, close_pipes=False)
        self._pump.join(5)
        if self._pump.is_alive():  # something of its session still holds stderr: end it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self._pump.join(5)
        assert self.proc.stderr is not None
        self.proc.stderr.close()
        return code


async def eventually(predicate: Any, timeout: float = 5.0, interval: float = 0.02) -> None:
    """Poll a condition another process makes true (an fd count, a file): bounded in time."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


async def read_backend_line(backend: Backend, timeout: float = 10.0) -> str:
    """Next line a backend printed on its stdout, without blocking the event loop."""
    assert backend.proc.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(backend.proc.stdout.readline), timeout)
    return line.strip()


async def wait_until(probe: Any, accept: Any, timeout: float = 5.0,
                     interval: float = 0.05) -> Any:
    """Await `probe()` until `accept(result)` holds, and return that result: for state another
    process changes and only answers about when asked (an HTTP endpoint). Bounded in time."""
    deadline = time.monotonic() + timeout
    while True:
        result = await probe()
        if accept(result):
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s; last: {result!r}")
        await asyncio.sleep(interval)


def blackhole(port: int = 0) -> list[Any]:
    """A listener (on `port`, or any) whose accept queue is full, so a connect to it hangs
    until the connecting side gives up. Returns the listener and its fillers: close them all."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(0)
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(listener.getsockname())
        fillers.append(filler)
    return [listener, *fillers]


# -- talking to a running balancer ------------------------------------------------------


async def who_answers(port: int, local_host: str | None = None) -> str:
    """Open a connection, read the backend's name line, close."""
    local = (local_host, 0) if local_host else None
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=local)
    line = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    await writer.wait_closed()
    return line.decode().strip()


def with_metrics(config: dict, **metrics: object) -> dict:
    """`config` with the admin endpoint (metrics, /status) on an ephemeral loopback port."""
    config["metrics"] = {"bind": "127.0.0.1:0", **metrics}
    return config


def admin_port(balancer) -> int:
    """The port the balancer's admin endpoint is on, from its log."""
    line = balancer.wait_for_line(r"admin endpoint on http://")
    return int(re.search(r":(\d+)/", line).group(1))


async def http(port: int, method: str = "GET", path: str = "/",
               headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """One HTTP/1.1 request to the admin endpoint: its status and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    host = "" if "host" in {k.lower() for k in headers or {}} else f"Host: 127.0.0.1:{port}\r\n"
    writer.write(f"{method} {path} HTTP/1.1\r\n{host}{extra}\r\n".encode())
    response = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """All samples, keyed by (name, sorted labels)."""
    status, body = await http(port, path="/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def total(samples: dict, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    return sum(value for (n, lbls), value in samples.items()
               if n == name and all(dict(lbls).get(k) == v for k, v in labels.items()))


def start_with_a_refusing_pooled_server(start_backend, start_balancer):
    """A balancer (metrics on) whose upstream has a good server and a refusing one, each
    with a pool of 2; one failure ejects for 30 s. Returns the balancer, the refusing
    address and the admin port."""
    good = start_backend("echo", "good")
    dead = f"127.0.0.1:{free_port()}"
    config = with_metrics(make_config([dead, good.address], pool={"size": 2},
                                      health={"max_fails": 1, "fail_timeout": "30s"}))
    balancer = start_balancer(config)
    return balancer, dead, admin_port(balancer)


def reset(sock: socket.socket) -> None:
    """Close `sock` with an RST instead of a FIN (SO_LINGER 0)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def attempts_on(balancer, address: str) -> int:
    """Failed connects to `address`, from the balancer's debug log."""
    return sum(f"connect to app/{address} failed" in line for line in balancer.lines)


def worker_pids(balancer) -> list[int]:
    """The primary's live worker processes."""
    children = Path(f"/proc/{balancer.pid}/task/{balancer.pid}/children").read_text().split()
    return [int(pid) for pid in children]


def start_workers(start_balancer, config: dict, workers: int = 2, *args: str, **kwargs: Any):
    """A balancer with `workers` workers, returned once every one has started."""
    config["workers"] = workers
    balancer = start_balancer(config, *args, **kwargs)
    for slot in range(workers):
        balancer.wait_for_line(rf"worker {slot} started", timeout=20)
    return balancer


def fd_count(pid: int) -> int:
    """Open descriptors of any process (BalancerProcess.fd_count is the primary's)."""
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


async def hold_echo_connections(port: int, count: int) -> list[asyncio.StreamWriter]:
    """`count` connections through the balancer on `port` to an echo server, each proven
    paired by a one-byte round trip and left open: close the writers to end them."""
    held = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"x")
        assert await reader.readexactly(1) == b"x"
        held.append(writer)
    return held


async def echo_round_trip(port: int, payload: bytes = b"ping") -> bool:
    """True when an echo server behind `port` sends `payload` back (False on any error)."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    try:
        writer.write(payload)
        writer.write_eof()
        return await asyncio.wait_for(reader.read(), 10) == payload
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()


# -- talking to a running balancer ------------------------------------------------------


def reload(balancer, config: dict) -> None:
    """Write the new config and SIGHUP; return once the balancer says it applied it."""
    before = sum("configuration reloaded" in line for line in balancer.lines)
    balancer.config_path.write_text(yaml.safe_dump(config))
    balancer.send_signal(signal.SIGHUP)
    balancer.wait_for_log(
        lambda: sum("configuration reloaded" in line for line in balancer.lines) > before, 10)


def start(start_balancer, config: dict, workers: int):
    """One process, or a primary and `workers` workers (the primary serves admin then)."""
    return start_workers(start_balancer, config, workers) if workers > 1 else \
        start_balancer(config)


def balancer(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """Run the `balancer` command to completion (check, reload, a failing start...)."""
    return subprocess.run(
        [sys.executable, "-m", "balancer", *args],
        capture_output=True, text=True, timeout=timeout,
    )


def write(tmp_path: Path, config: object, name: str = "c.yaml") -> str:
    """Write a config (a dict as YAML, or text as is) under `tmp_path`; return its path."""
    path = tmp_path / name
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    return str(path)


def refragment(hello: bytes, sizes: list[int]) -> bytes:
    """The same handshake message re-cut into TLS records of the given sizes (RFC 8446 5.1)."""
    message = hello[5:]
    header = hello[:3]
    records = []
    position = 0
    for size in [*sizes, len(message)]:
        if position >= len(message):
            break
        piece = message[position : position + max(1, size)]
        records.append(header + len(piece).to_bytes(2, "big") + piece)
        position += len(piece)
    return b"".join(records)


# -- talking to a running balancer ------------------------------------------------------


async def admin_status(port: int) -> dict:
    """The admin endpoint's /status document."""
    code, body = await http(port, path="/status")
    assert code == 200
    return json.loads(body)


def converged(generation: int, workers: int = 2):
    """A `wait_until` test: the primary is on `generation` and so is every worker."""
    def accept(state: dict) -> bool:
        return (state["generation"] == generation
                and len(state["workers"]) == workers
                and all(w["generation"] == generation and w["state"] == "serving"
                        for w in state["workers"]))
    return accept


def rewrite(balancer, config: dict) -> None:
    """Replace the balancer's config file (without telling it)."""
    balancer.config_path.write_text(yaml.safe_dump(config))
