"""The host's connection-tracking table: a full one silently drops new connections.

Where netfilter's conntrack is loaded (iptables NAT rules, podman and Docker load it), every
loopback connection of a run takes an entry that stays 120 s in TIME_WAIT. One connection
figure at ~8,000 connections a second makes two entries per connection (client to proxy,
proxy to backend), so a full run fills the default 262,144-entry table within minutes, and
from then on the kernel drops SYNs (`nf_conntrack: table full, dropping packet`): a proxy
then looks stalled or fails with connect errors that are the host's, not its own.

So the harness records the table's fill at the start and end of a run, and `--notrack`
exempts loopback traffic from tracking for the run's length (two rules in iptables' `raw`
table, as HAProxy's own benchmarking advice has it; removed at the end, and stale ones of a
killed run are removed at the next start).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

_PROC = Path("/proc/sys/net/netfilter")
_TAG = "balancer-bench-notrack"
_RULES = (["PREROUTING", "-i", "lo"], ["OUTPUT", "-o", "lo"])


def fill() -> tuple[int, int] | None:
    """(entries, maximum) of the conntrack table, or None where conntrack is not loaded."""
    try:
        count = int((_PROC / "nf_conntrack_count").read_text())
        most = int((_PROC / "nf_conntrack_max").read_text())
    except (OSError, ValueError):
        return None
    return count, most


def nearly_full(reading: tuple[int, int] | None) -> bool:
    """Above 90%: drops are near, or have happened between two readings."""
    return reading is not None and reading[0] >= 0.9 * reading[1]


def _iptables(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["iptables", "-t", "raw", *args], capture_output=True, text=True,
                          timeout=30, check=False)


def untrack_loopback() -> str | None:
    """Add the two rules; None on success, else why not (then nothing was changed)."""
    if shutil.which("iptables") is None:
        return "iptables is not installed (apt-get install -y iptables)"
    if os.geteuid() != 0:
        return "not root"
    restore_tracking()  # a killed run's rules
    comment = ["-m", "comment", "--comment", f"{_TAG} {os.getpid()}"]
    for rule in _RULES:
        done = _iptables("-I", *rule, *comment, "-j", "CT", "--notrack")
        if done.returncode:
            restore_tracking()
            return f"iptables failed: {done.stderr.strip()}"
    return None


def restore_tracking() -> None:
    """Remove every rule this module added (of this run or an earlier, killed one)."""
    listed = _iptables("-S").stdout
    for line in listed.splitlines():
        if _TAG in line and line.startswith("-A "):
            _iptables("-D", *shlex.split(line)[1:])


@contextlib.contextmanager
def loopback_untracked(wanted: bool) -> Iterator[list[str]]:
    """For the length of the block, loopback exempt from conntrack when `wanted`. Yields the
    lines for the report's header, "; "-joined: the table's fill at the start, whether the
    exemption held, and (once the block has ended) the fill at the end."""
    reading = fill()
    if reading is None:
        yield ["conntrack not loaded"]
        return
    state = [f"conntrack table {reading[0]:,} of {reading[1]:,} entries at start"]
    why = untrack_loopback() if wanted else "no --notrack"
    state.append("loopback not tracked (--notrack)" if why is None
                 else f"loopback tracked ({why})")
    try:
        yield state
    finally:
        if why is None:
            restore_tracking()
        end = fill()
        if end is not None:
            state.append(f"{end[0]:,} at end")


def add_flag(parser: argparse.ArgumentParser) -> None:
    """The `--notrack` option every churning benchmark takes (see `loopback_untracked`)."""
    parser.add_argument("--notrack", action="store_true",
                        help="exempt loopback from the host's conntrack table for the run "
                             "(root, iptables): a filling table slows new connections run "
                             "after run, and a full one drops them")
