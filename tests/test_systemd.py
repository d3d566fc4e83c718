"""deploy/systemd: the unit passes `systemd-analyze verify` without a single warning, keeps
its sandbox score, says what a drain-friendly, reloadable `Type=notify` service needs, and
runs as the user its sysusers file creates.

systemd is not PID 1 in this container, but systemd-analyze works offline: `verify --root`
reads the unit from a root folder holding it, the system's own units it depends on
(`multi-user.target`, ...) and a stand-in for each command it runs (verify checks that
every Exec command is an executable file)."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

from balancer.config import Config

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "deploy" / "systemd" / "balancer.service"
SYSUSERS = REPO / "deploy" / "systemd" / "balancer.sysusers"
SYSTEM_UNITS = next((p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
                     if (p / "multi-user.target").exists()), None)
WORKER_GRACE = 5  # the primary waits shutdown_timeout + this for its workers (supervisor.py)

needs_systemd = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None or SYSTEM_UNITS is None,
    reason="systemd-analyze and systemd's units are not installed (apt-get install systemd; "
           ".ci/run does)")


def service() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser["Service"]


def make_root(tmp_path: Path, unit_text: str) -> Path:
    """A root folder with the unit installed, systemd's units, and every Exec command."""
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "etc/systemd/system" / UNIT.name).write_text(unit_text)
    assert SYSTEM_UNITS is not None
    shutil.copytree(SYSTEM_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    for key in ("ExecStartPre", "ExecStart", "ExecReload"):
        command = Path(service()[key].split()[0].lstrip("-@+!:"))
        stand_in = root / command.relative_to("/")
        stand_in.parent.mkdir(parents=True, exist_ok=True)
        stand_in.write_text("#!/bin/sh\n")
        stand_in.chmod(0o755)
    return root


def verify(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "verify", f"--root={root}", UNIT.name],
                          capture_output=True, text=True, timeout=60)


@needs_systemd
def test_systemd_analyze_verify_finds_nothing_to_say(tmp_path: Path) -> None:
    result = verify(make_root(tmp_path, UNIT.read_text()))
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@needs_systemd
def test_verify_as_run_here_does_report_a_bad_unit(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key and a bad value are reported (on stderr,
    with exit code 0, which is why the check reads the output)."""
    text = UNIT.read_text().replace("NoNewPrivileges=yes", "NoNewPrivilege=yes\nRestartSec=soon")
    output = verify(make_root(tmp_path, text)).stderr
    assert "Unknown key 'NoNewPrivilege'" in output
    assert "Failed to parse sec value" in output


@needs_systemd
def test_the_sandbox_keeps_its_exposure_score(tmp_path: Path) -> None:
    """`systemd-analyze security` rates exposure from 0 (locked down) to 10; ours is 1.8.
    Loosening the sandbox by accident fails here (--threshold is in tenths)."""
    root = make_root(tmp_path, UNIT.read_text())
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", f"--root={root}", "--threshold=20",
         str(root / "etc/systemd/system" / UNIT.name)],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr


def test_the_unit_is_a_reloadable_draining_notify_service() -> None:
    unit = service()
    assert unit["Type"] == "notify"
    assert unit["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert unit["ExecStart"].split()[1:] == ["-c", "/etc/balancer/balancer.yaml"]
    assert unit["ExecStartPre"].split()[1:] == ["check", "-c", "/etc/balancer/balancer.yaml"]
    assert unit["KillSignal"] == "SIGTERM"
    # Workers must hear of the stop from the primary only (a second SIGTERM closes at once).
    assert unit["KillMode"] == "mixed"
    stop = unit["TimeoutStopSec"]
    assert stop.endswith("s") and int(stop[:-1]) > Config((), {}).shutdown_timeout + WORKER_GRACE
    assert unit["Restart"] == "on-failure"
    assert int(unit["LimitNOFILE"]) >= 65536
    assert unit["User"] == "balancer"
    assert unit["AmbientCapabilities"] == unit["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    assert unit["ProtectSystem"] == "strict"
    assert unit["NoNewPrivileges"] == "yes"


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None,
                    reason="systemd-sysusers is not installed (apt-get install systemd)")
def test_the_sysusers_file_creates_the_units_user(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    subprocess.run(["systemd-sysusers", f"--root={tmp_path}", str(SYSUSERS)], check=True,
                   capture_output=True, timeout=60)
    passwd = (tmp_path / "etc/passwd").read_text().splitlines()
    users = {line.split(":")[0]: line for line in passwd}
    assert users[service()["User"]].endswith(":/usr/sbin/nologin")
    groups = (tmp_path / "etc/group").read_text().splitlines()
    assert any(line.startswith(service()["Group"] + ":") for line in groups)
