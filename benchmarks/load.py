"""Load generators: wrk (request rates, latency), iperf3 (bulk), and an idle-connection holder.

Each returns plain numbers parsed from the tool's output; a tool failure raises
`LoadError` with the tool's own message so the run is reported as failed, not as zero.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from .procs import CPU_LOAD, pinned

UNIT_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class LoadError(RuntimeError):
    """The load tool failed or printed something we could not parse."""


@dataclass
class WrkResult:
    """What one wrk run reports."""

    requests: int
    seconds: float
    rate: float
    p99_ms: float | None
    socket_errors: int
    non_2xx: int
    raw: str = ""

    @property
    def errors(self) -> int:
        return self.socket_errors + self.non_2xx


def _duration(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not m:
        raise LoadError(f"cannot parse wrk duration {text!r}")
    return float(m.group(1)) * UNIT_SECONDS[m.group(2)]


def parse_wrk(out: str) -> WrkResult:
    """Parse wrk 4.x text output (the `--latency` distribution is optional)."""
    m = re.search(r"(\d+) requests in ([\d.]+\w+),", out)
    if not m:
        raise LoadError("wrk printed no request count: " + " | ".join(out.strip().splitlines()))
    requests, seconds = int(m.group(1)), _duration(m.group(2))
    rate_m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    rate = float(rate_m.group(1)) if rate_m else requests / seconds
    p99_m = re.search(r"^\s+99%\s+([\d.]+\w+)\s*$", out, re.M)
    p99 = round(_duration(p99_m.group(1)) * 1000, 3) if p99_m else None
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    socket_errors = sum(int(g) for g in sock.groups()) if sock else 0
    non = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return WrkResult(requests, seconds, rate, p99, socket_errors,
                     int(non.group(1)) if non else 0, out)


def run_wrk(port: int, seconds: float, connections: int, close: bool = False,
            latency: bool = False, url: str | None = None) -> WrkResult:
    """One wrk thread on CPU 1 against 127.0.0.1:port (or `url`, e.g. https)."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "5s"]
    if close:
        cmd += ["-H", "Connection: close"]
    if latency:
        cmd.append("--latency")
    cmd.append(url or f"http://127.0.0.1:{port}/")
    try:
        done = subprocess.run(pinned(cmd, CPU_LOAD), capture_output=True, text=True,
                              timeout=seconds + 60, check=False)
    except subprocess.TimeoutExpired as exc:
        raise LoadError(f"wrk did not finish within {seconds + 60:.0f}s") from exc
    if done.returncode != 0:
        raise LoadError(f"wrk exit {done.returncode}: {done.stderr.strip() or done.stdout}")
    return parse_wrk(done.stdout)


def run_iperf(port: int, seconds: float, streams: int = 1) -> float:
    """`streams` TCP streams (iperf3 -P), client on CPU 1, for `seconds`; received Gbit/s."""
    cmd = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", f"{seconds:g}", "-J",
           "-P", str(streams)]
    try:
        done = subprocess.run(pinned(cmd, CPU_LOAD), capture_output=True, text=True,
                              timeout=seconds + 60, check=False)
    except subprocess.TimeoutExpired as exc:
        raise LoadError(f"iperf3 did not finish within {seconds + 60:.0f}s") from exc
    try:
        data = json.loads(done.stdout)
    except json.JSONDecodeError as exc:
        raise LoadError(f"iperf3 exit {done.returncode}: {done.stderr.strip()}") from exc
    if "error" in data:
        raise LoadError(f"iperf3: {data['error']}")
    try:
        return float(data["end"]["sum_received"]["bits_per_second"]) / 1e9
    except KeyError as exc:
        raise LoadError("iperf3 JSON has no end.sum_received") from exc


def parse_s_time(out: str) -> int:
    """The connection count of `openssl s_time` ("N connections in Ts; ..."); 0 is an error
    (every handshake failed) rather than a figure."""
    match = re.search(r"^(\d+) connections in [\d.]+s;", out, re.M)
    if not match or not int(match.group(1)):
        raise LoadError(f"s_time made no connection: {out.strip()[-300:]!r}")
    return int(match.group(1))


def run_s_time(port: int, seconds: float) -> int:
    """New connections, each a full handshake and one GET, for `seconds`; how many."""
    cmd = ["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-new",
           "-time", f"{seconds:g}", "-www", "/"]
    done = subprocess.run(pinned(cmd, CPU_LOAD), capture_output=True, text=True,
                          timeout=seconds + 60, check=False)
    if done.returncode != 0:
        raise LoadError(f"s_time exit {done.returncode}: {done.stderr.strip()[-300:]}")
    return parse_s_time(done.stdout)


REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"


async def _open_one(port: int, timeout: float) -> asyncio.StreamWriter:
    """Connect and complete one request, proving the proxy has a live upstream connection."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    try:
        writer.write(REQUEST)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        m = re.search(rb"content-length:\s*(\d+)", head, re.I)
        if not head.startswith(b"HTTP/1.1 200") or not m:
            raise LoadError(f"unexpected response {head[:40]!r}")
        await asyncio.wait_for(reader.readexactly(int(m.group(1))), timeout)
    except BaseException:
        writer.close()
        raise
    return writer


async def _hold(port: int, count: int, measure: Callable[[int], None],
                timeout: float) -> tuple[int, list[str]]:
    gate = asyncio.Semaphore(100)

    async def one() -> asyncio.StreamWriter:
        async with gate:
            return await _open_one(port, timeout)

    results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    writers = [r for r in results if isinstance(r, asyncio.StreamWriter)]
    errors = sorted({f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)})
    try:
        await asyncio.sleep(0.5)  # let the proxy settle its buffers before we look at RSS
        measure(len(writers))
    finally:
        for w in writers:
            w.close()
        await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)
    return len(writers), errors


def hold_idle(port: int, count: int, measure: Callable[[int], None],
              timeout: float = 10.0) -> tuple[int, list[str]]:
    """Open `count` keep-alive connections (one request each), call `measure(open)`, close.

    Returns how many were open and the distinct errors of the ones that failed.
    """
    return asyncio.run(_hold(port, count, measure, timeout))
