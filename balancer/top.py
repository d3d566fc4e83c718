"""`balancer top`: the status page's tables in a terminal, refreshed every second.

It reads `/status` from the admin endpoint (`--url`, or `metrics.bind` of `-c FILE`) and
draws plain ANSI: one line per server (down first, as on the page), cut to the terminal's
width instead of wrapping, and as many lines as fit. No dependency: a table of text needs no
`rich`. Ctrl-C ends it quietly; an endpoint that stops answering ends it with one line.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from .config import Config

RANK = {"down": 0, "half_open": 1, "draining": 2, "up": 3}
TIMEOUT = 3.0  # seconds for one /status request
RED, GREEN, YELLOW, BLUE, DIM, BOLD, RESET = (
    "\x1b[31m", "\x1b[32m", "\x1b[33m", "\x1b[34m", "\x1b[2m", "\x1b[1m", "\x1b[0m")
STATE_COLOUR = {"up": GREEN, "serving": GREEN, "down": RED, "half_open": YELLOW,
                "starting": YELLOW, "draining": BLUE, "retiring": BLUE}


class Unreachable(Exception):
    """/status did not answer (refused, timed out, not JSON): `top` ends with this line."""


def url_of(config: Config) -> str:
    """The admin endpoint of a config, as this machine reaches it."""
    if config.metrics is None:
        raise Unreachable("the config has no metrics.bind: top reads /status from the admin "
                          "endpoint")
    host, port = config.metrics.bind.host, config.metrics.bind.port
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def fetch(url: str) -> dict[str, Any]:
    target = url.rstrip("/") + "/status"
    try:
        with urllib.request.urlopen(target, timeout=TIMEOUT) as response:
            data: dict[str, Any] = json.load(response)
            return data
    except urllib.error.HTTPError as exc:
        raise Unreachable(f"{target} answered {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        reason = getattr(exc.reason, "strerror", None) or exc.reason
        raise Unreachable(f"cannot reach {target}: {reason}") from None
    except (OSError, ValueError) as exc:
        raise Unreachable(f"cannot read {target}: {exc}") from None


# -- formatting -------------------------------------------------------------------------------


def dur(seconds: float) -> str:
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def short(value: float | None) -> str:
    """4.5M, 376K: 1024-based, as on the page."""
    if value is None:
        return "-"
    for unit in ("", "K", "M", "G"):
        if value < 1024:
            return f"{value:.0f}{unit}" if not unit or value >= 10 else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}T"


def rate(value: float | None) -> str:
    value = value or 0.0
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


Column = tuple[str, Callable[[dict[str, Any]], str], bool]  # header, cell, right-aligned

SERVER_COLUMNS: list[Column] = [
    ("SERVER", lambda s: s["address"] + (" (backup)" if s.get("backup") else ""), False),
    ("STATE", lambda s: f"{s['state'].replace('_', '-')} {dur(s['state_for'])}", False),
    ("OPEN", lambda s: f"{s['active']}" + (f"/{s['max_conns']}" if s["max_conns"] else ""),
     True),
    ("PEAK", lambda s: str(s["peak"]), True),
    ("CONN/S", lambda s: rate(s.get("conn_rate")), True),
    ("TOTAL", lambda s: str(s["connections"]), True),
    ("IN/OUT", lambda s: f"{short(s['bytes_in'])}/{short(s['bytes_out'])}", True),
    ("PER S", lambda s: f"{short(s.get('bytes_in_rate'))}/{short(s.get('bytes_out_rate'))}",
     True),
    ("FAIL", lambda s: str(s["failures"]), True),
    ("ERR/RETRY", lambda s: f"{s['connect_errors']}/{s['retries']}", True),
    ("CONNECT", lambda s: "-" if s["connect_time_avg_ms"] is None
     else f"{s['connect_time_avg_ms']:.1f}ms", True),
    ("DOWN", lambda s: dur(s["downtime"]) if s["downtime"] else "-", True),
    ("CHECK", lambda s: s["check"]["text"] if s.get("check") else "-", False),
    ("FOUND BY", lambda s: s.get("source", "static"), False),
    ("LAST CHANGE", lambda s: s["reason"], False),
]
WORKER_COLUMNS: list[Column] = [
    ("SLOT", lambda w: str(w["slot"]), True),
    ("PID", lambda w: str(w["pid"]), True),
    ("STATE", lambda w: w["state"], False),
    ("UPTIME", lambda w: dur(w.get("uptime", 0)), True),
    ("RESTARTS", lambda w: str(w.get("restarts", 0)), True),
    ("OPEN", lambda w: str(w.get("active", 0)), True),
    ("CONN/S", lambda w: rate(w.get("conn_rate")), True),
    ("RSS", lambda w: short(w.get("rss")), True),
    ("BEAT", lambda w: f"{w.get('heartbeat_age', 0) * 1000:.0f}ms", True),
    ("GEN", lambda w: str(w["generation"]), True),
    ("LAST EXIT", lambda w: w.get("last_exit") or "", False),
]
INSTANCE_COLUMNS: list[Column] = [
    ("INSTANCE", lambda i: f"#{i.get('index')}", False),
    ("PID", lambda i: str(i.get("pid") or "-"), True),
    ("PORT", lambda i: str(i.get("port") or "-"), True),
    ("STATE", lambda i: str(i.get("state", "")), False),
    ("RESTARTS", lambda i: str(i.get("restarts", 0)), True),
    ("UPTIME", lambda i: dur(i["uptime"]) if i.get("uptime") else "-", True),
    ("RSS", lambda i: short(i.get("rss")), True),
    ("LAST EXIT", lambda i: str(i.get("last_exit") or ""), False),
]


def table(columns: Sequence[Column], rows: Sequence[dict[str, Any]], colour: bool,
          indent: str = "  ") -> list[str]:
    """Aligned text lines: a header, then one line per row (states coloured on a tty)."""
    cells = [[cell(row) for _, cell, _ in columns] for row in rows]
    widths = [max([len(header), *(len(line[k]) for line in cells)])
              for k, (header, _, _) in enumerate(columns)]

    def line(values: list[str], state: str | None = None) -> str:
        parts = []
        for k, value in enumerate(values):
            text = value.rjust(widths[k]) if columns[k][2] else value.ljust(widths[k])
            if colour and state is not None and columns[k][0] == "STATE":
                text = STATE_COLOUR.get(state, "") + text + RESET
            parts.append(text)
        return (indent + "  ".join(parts)).rstrip()

    header = line([h for h, _, _ in columns])
    out = [f"{DIM}{header}{RESET}" if colour else header]
    out += [line(values, row.get("state")) for values, row in zip(cells, rows, strict=True)]
    return out


def render(status: dict[str, Any], colour: bool = False) -> list[str]:
    """The whole screen, as lines not yet cut to the terminal's width."""
    process = status.get("primary") or status["process"]
    role = "primary" if "primary" in status else "process"
    when = time.strftime("%H:%M:%S", time.localtime(status["time"]))
    lines = [f"{BOLD if colour else ''}balancer{RESET if colour else ''}  {role} pid "
             f"{process['pid']}, up {dur(process['uptime'])}"
             + (f", generation {status['generation']}" if "generation" in status else "")
             + f"  {when}" + ("  (Ctrl-C to quit)" if colour else "")]
    for lst in status["listeners"]:
        rejected = ", ".join(f"{k} {v}" for k, v in (lst.get("rejected") or {}).items() if v)
        limit = f"/{lst['max_conns']}" if lst.get("max_conns") else ""
        tls = (f", tls errors {lst['tls_handshake_errors']}"
               if lst.get("tls_handshake_errors") is not None else "")
        lines.append(
            f"listener {lst['name']} {lst['bind']} -> {lst.get('upstream') or '(sni)'}: "
            f"open {lst['active']}{limit}, {rate(lst.get('conn_rate'))} conn/s "
            f"(peak {rate(lst.get('conn_rate_peak'))}), {lst.get('connections', 0)} total"
            + (f", rejected {rejected}" if rejected else "") + tls)
    if status.get("workers"):
        lines += ["", "workers"]
        lines += table(WORKER_COLUMNS, status["workers"], colour)
    for name, up in status["upstreams"].items():
        servers = sorted(up["servers"], key=lambda s: RANK.get(s["state"], 9))
        summary = up.get("summary", "")
        strategy = f"{up['strategy']}, {up['hash']}" if up.get("hash") else up["strategy"]
        head = f"upstream {name} ({strategy}): {summary}"
        bad = up.get("up", 0) < up.get("total", 0)
        lines += ["", f"{RED}{head}{RESET}" if colour and bad else head]
        columns = SERVER_COLUMNS
        if all(s.get("source", "static") == "static" for s in servers):
            columns = [c for c in columns if c[0] != "FOUND BY"]
        lines += table(columns, servers, colour)
        if up.get("instances"):
            lines += table(INSTANCE_COLUMNS, up["instances"], colour, indent="    ")
    return lines


def visible_cut(line: str, width: int) -> str:
    """`line` cut to `width` visible characters (escape sequences take no room)."""
    out, seen, k = [], 0, 0
    while k < len(line) and seen < width:
        if line[k] == "\x1b":
            end = line.find("m", k)
            end = len(line) - 1 if end < 0 else end
            out.append(line[k : end + 1])
            k = end + 1
            continue
        out.append(line[k])
        seen += 1
        k += 1
    text = "".join(out)
    return text + RESET if "\x1b" in text else text


def frame(lines: list[str], width: int, height: int) -> str:
    """One screenful: from the top-left corner, each line cleared to its end, no wrapping."""
    if len(lines) > height:
        hidden = len(lines) - height + 1
        lines = [*lines[: height - 1], f"... {hidden} more line(s): enlarge the terminal"]
    body = "\r\n".join(visible_cut(line, width) + "\x1b[K" for line in lines)
    return "\x1b[H" + body + "\x1b[J"


def run(url: str, interval: float = 1.0, once: bool = False, out: TextIO = sys.stdout,
        err: TextIO = sys.stderr) -> int:
    """Draw until Ctrl-C (0) or until the endpoint stops answering (1, one line on `err`)."""
    tty = out.isatty() and not once
    try:
        status = fetch(url)
        if not tty:
            out.write("\n".join(render(status)) + "\n")
            if once:
                return 0
        else:
            out.write("\x1b[?1049h\x1b[?25l")  # the alternate screen, no cursor
        while True:
            if tty:
                size = shutil.get_terminal_size()
                out.write(frame(render(status, colour=True), size.columns, size.lines))
                out.flush()
            time.sleep(interval)
            status = fetch(url)
            if not tty:
                out.write("\n" + "\n".join(render(status)) + "\n")
                out.flush()
    except KeyboardInterrupt:
        return 0
    except Unreachable as exc:
        if tty:
            out.write("\x1b[?25h\x1b[?1049l")
            tty = False
        out.flush()
        err.write(f"balancer top: {exc}\n")
        return 1
    finally:
        if tty:
            out.write("\x1b[?25h\x1b[?1049l")  # back to the screen as it was
            out.flush()
