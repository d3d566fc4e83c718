"""The Dockerfile's image in real containers: app replicas behind one DNS name, as
`docker compose --scale` makes them, scaled up and down while a client keeps connecting.

Podman runs here with the recipe from issue 13: runc (crun is refused), cgroupfs, explicit
ulimits, a network of its own whose DNS answers for every container started with
`--network-alias app`. There is no registry for base images, so the base is a Debian
bookworm built with debootstrap and imported, cached under /var/tmp between runs; the
image's Python packages come from wheels the host's pip fetched (the build has no index).
All traffic stays inside the podman network: the host only runs podman commands, and sets
up two things about the network's bridge that podman 4.3 (netavark 1.4) leaves out and a
shared machine needs (see Network.pin_bridge_mac and Network.untrack).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
CACHE = Path("/var/tmp/balancer-podman")
BASE_IMAGE = "localhost/balancer-base:bookworm"
IMAGE = "localhost/balancer:podman-test"
PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs"]
ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1000:1000"]
LABEL = f"balancer-test={os.getpid()}"

# Connects to balancer:8080 again and again until told `stop` on stdin (or 300 s), one
# short HTTP request per connection; prints `ok NAME` or `fail REASON` for each, then `done`.
CLIENT = r"""
import socket, sys, threading, time
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
deadline = time.monotonic() + 300
# The balancer's address, once: what is measured is connecting through the balancer, not
# podman's DNS answering for the client (it misses a query now and then while a container
# joins the network).
for _ in range(50):
    try:
        address = socket.getaddrinfo("balancer", 8080, socket.AF_INET, socket.SOCK_STREAM)[0][4]
        break
    except OSError:
        time.sleep(0.2)
print("resolved", address[0], flush=True)
while not stop.is_set() and time.monotonic() < deadline:
    try:
        with socket.create_connection(address, timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: balancer\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
        text = data.decode(errors="replace")
        if not text.startswith("HTTP/1.1 200") or "hello from " not in text:
            raise OSError(f"bad answer {text[:60]!r}")
        print("ok", text.split("hello from ", 1)[1].split()[0], flush=True)
    except OSError as exc:
        print("fail", repr(exc), flush=True)
    time.sleep(0.01)
print("done", flush=True)
"""


def podman(*args: str, timeout: float = 120, check: bool = True
           ) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args[:3])} failed ({result.returncode}): "
                             f"{result.stderr[-2000:]}")
    return result


def host(*command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """A command on the host that the network's setup needs (ip, iptables)."""
    result = subprocess.run(list(command), capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}): "
                             f"{result.stderr[-500:]}")
    return result


def missing_tools() -> str | None:
    tools = ("podman", "runc", "debootstrap", "ip", "iptables")
    needed = [tool for tool in tools if shutil.which(tool) is None]
    if needed:
        return (f"{', '.join(needed)} not installed "
                "(apt-get install podman runc debootstrap iproute2 iptables)")
    return None


@pytest.fixture(scope="module")
def base_image() -> str:
    """Debian bookworm minbase with python3 and venv, built once and cached: the image in
    podman's store, and its tarball under /var/tmp in case the store was wiped."""
    reason = missing_tools()
    if reason:
        pytest.skip(reason)
    info = subprocess.run([*PODMAN, "info"], capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        pytest.skip(f"podman cannot run here: {info.stderr.strip()[-300:]}")
    if podman("image", "exists", BASE_IMAGE, check=False).returncode == 0:
        return BASE_IMAGE
    CACHE.mkdir(parents=True, exist_ok=True)
    tarball = CACHE / "bookworm-minbase.tar"
    if not tarball.exists():
        root = Path(tempfile.mkdtemp(prefix="rootfs-", dir=CACHE))
        try:
            built = subprocess.run(
                ["debootstrap", "--variant=minbase", "--include=python3,python3-venv",
                 "bookworm", str(root)], capture_output=True, text=True, timeout=900)
            if built.returncode != 0:
                pytest.skip(f"debootstrap failed: {built.stdout[-300:]} {built.stderr[-300:]}")
            partial = tarball.with_suffix(".part")
            subprocess.run(["tar", "-C", str(root), "-cf", str(partial), "."], check=True,
                           timeout=300)
            partial.rename(tarball)  # whole or not at all, for the next run
        finally:
            shutil.rmtree(root, ignore_errors=True)
    podman("import", str(tarball), BASE_IMAGE, timeout=300)
    return BASE_IMAGE


@pytest.fixture(scope="module")
def image(base_image: str) -> str:
    """The Dockerfile built on the Debian base. pip in the build reads a pip.conf mounted for
    the build only, pointing at wheels the host fetched: the Dockerfile itself is the one
    users build against PyPI."""
    digest = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()[:16]
    wheels = CACHE / f"wheels-{digest}"
    if not wheels.exists():
        partial = Path(tempfile.mkdtemp(prefix="wheels-", dir=CACHE))
        pip = [str(Path(sys.executable).parent / "pip"), "--disable-pip-version-check"]
        subprocess.run([*pip, "wheel", "-q", "--wheel-dir", str(partial), str(REPO)],
                       check=True, timeout=600)
        subprocess.run([*pip, "download", "-q", "--dest", str(partial), "setuptools>=68",
                        "wheel"], check=True, timeout=600)
        for own in partial.glob("balancer-*.whl"):  # the build installs the source itself
            own.unlink()
        partial.rename(wheels)
    pip_conf = CACHE / "pip.conf"
    pip_conf.write_text("[global]\nno-index = true\nfind-links = /wheels\n")
    podman("build", *ULIMITS, "--format", "docker", "--build-arg", f"BASE={base_image}",
           "-v", f"{wheels}:/wheels:ro", "-v", f"{pip_conf}:/etc/pip.conf:ro",
           "-t", IMAGE, "-f", str(REPO / "Dockerfile"), str(REPO), timeout=600)
    return IMAGE


class Network:
    """A podman network and the containers the test started in it, all removed at the end."""

    def __init__(self, image: str) -> None:
        self.image = image
        self.name = f"baltest-{os.getpid()}"
        self.containers: list[str] = []
        self.untracked: list[list[str]] = []  # the raw-table rules added, to delete at the end
        self.pinned = False
        podman("network", "create", "--label", LABEL, self.name)
        try:
            self.bridge = podman("network", "inspect", self.name, "--format",
                                 "{{.NetworkInterface}}").stdout.strip()
            self.untrack()
        except BaseException:
            self.close()
            raise

    def untrack(self) -> None:
        """Keep this network's packets out of the host's connection tracking.

        Every packet of the network passes the host's netfilter (the DNS server is on the
        host's end of the bridge, and bridge-nf-call-iptables sends bridged frames there too),
        so each new flow takes an entry in the host's conntrack table, which everything else on
        the machine shares. Loopback benchmarks filled it here (241,595 of 262,144 entries,
        TIME_WAIT, kept 120 s) and the kernel dropped new flows ("nf_conntrack: table full,
        dropping packet"): the balancer's DNS queries never reached the bridge and its connects
        went unanswered. Nothing in this network needs the host's NAT or connection state."""
        stale_rules()
        comment = ["-m", "comment", "--comment", f"{LABEL} untracked"]
        for rule in (["PREROUTING", "-i", self.bridge, *comment, "-j", "CT", "--notrack"],
                     ["OUTPUT", "-o", self.bridge, *comment, "-j", "CT", "--notrack"]):
            host("iptables", "-t", "raw", "-I", *rule)
            self.untracked.append(rule)

    def pin_bridge_mac(self) -> None:
        """Give the bridge a MAC address of its own, once it exists (with the first container).

        netavark before 1.9 leaves it to the kernel, which gives a bridge the lowest MAC of its
        ports: a container that joins or leaves can change it, and a container that already
        knows the gateway's MAC (the balancer, asking aardvark-dns there every second) goes on
        sending to the old one, which the bridge drops, until its ARP entry expires: 20-50 s
        without DNS, seen here whichever the loop. netavark 1.9 sets a static MAC on the bridge
        it creates (containers/netavark 730e1bf, "bridge: force static mac on bridge
        interface"); so does this, keeping the MAC the bridge has now."""
        mac = Path(f"/sys/class/net/{self.bridge}/address").read_text().strip()
        host("ip", "link", "set", "dev", self.bridge, "address", mac)
        kind = Path(f"/sys/class/net/{self.bridge}/addr_assign_type").read_text().strip()
        assert kind == "3", f"{self.bridge}: MAC still chosen by the kernel (type {kind})"
        self.pinned = True

    def run(self, name: str, options: list[str], command: list[str]) -> str:
        """Start a container of the image, detached, in this network."""
        full = f"{name}-{os.getpid()}"
        self.containers.append(full)
        podman("run", "-d", *ULIMITS, "--label", LABEL, "--name", full, "--network",
               self.name, *options, self.image, *command, timeout=60)
        if not self.pinned:  # before a second container joins and another talks to the gateway
            self.pin_bridge_mac()
        return full

    def app(self, name: str) -> str:
        """A replica of the sample app: one more address behind the name `app`."""
        return self.run(name, ["--network-alias", "app", "--entrypoint", "python3"],
                        ["-m", "balancer.demo.backend", "--host", "0.0.0.0", "--port", "3000",
                         "--name", name])

    def gateway(self) -> str:
        """Where the network's DNS server (aardvark-dns) answers."""
        result = podman("network", "inspect", self.name, "--format",
                        "{{range .Subnets}}{{.Gateway}}{{end}}")
        return result.stdout.strip()

    def address(self, container: str) -> str:
        result = podman("inspect", "--format",
                        f'{{{{(index .NetworkSettings.Networks "{self.name}").IPAddress}}}}',
                        container)
        return result.stdout.strip()

    def logs(self, container: str) -> str:
        result = podman("logs", container, check=False)
        return result.stdout + result.stderr

    def wait_for_log(self, container: str, pattern: str, timeout: float = 30) -> str:
        """Poll the container's log (bounded) until `pattern` matches; returns the log."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.logs(container)
            if re.search(pattern, log):
                return log
            if time.monotonic() > deadline:
                raise AssertionError(f"{container}: no {pattern!r} in its log:\n{log[-3000:]}")
            time.sleep(0.3)

    def close(self) -> None:
        for container in reversed(self.containers):
            podman("rm", "-f", "-t", "0", container, check=False)
        podman("network", "rm", "-f", self.name, check=False)
        for rule in self.untracked:
            host("iptables", "-t", "raw", "-D", *rule, check=False)
        self.untracked = []


def stale_rules() -> None:
    """Delete the untracking rules of earlier runs that did not end cleanly (killed): a rule
    left behind would keep a later network of the same bridge name out of conntrack (and NAT)."""
    listed = host("iptables", "-t", "raw", "-S").stdout
    for line in listed.splitlines():
        found = re.search(r'--comment "?balancer-test=(\d+) untracked', line)
        if found is None or not line.startswith("-A "):
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(found.group(1)), 0)
            continue  # a run still going
        host("iptables", "-t", "raw", "-D", *shlex.split(line)[1:], check=False)


@pytest.fixture
def network(image: str) -> Iterator[Network]:
    net = Network(image)
    try:
        yield net
    finally:
        net.close()


class Client:
    """The client container, attached: its lines are collected as they come."""

    def __init__(self, network: Network) -> None:
        self.name = f"client-{os.getpid()}"
        network.containers.append(self.name)
        self.proc = subprocess.Popen(
            [*PODMAN, "run", "--rm", "-i", *ULIMITS, "--label", LABEL, "--name", self.name,
             "--network", network.name, "--entrypoint", "python3", network.image,
             "-c", CLIENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.changed:
                self.lines.append(line.strip())
                self.changed.notify_all()

    def served(self) -> list[str]:
        return [line.split()[1] for line in list(self.lines) if line.startswith("ok ")]

    def failures(self) -> list[str]:
        return [line for line in list(self.lines) if line.startswith("fail ")]

    def wait(self, predicate, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        with self.changed:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.proc.poll() is not None:
                    raise AssertionError(f"client: condition not met; last lines "
                                         f"{self.lines[-10:]}")
                self.changed.wait(min(remaining, 0.5))

    def stop(self) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.write("stop\n")
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.reader.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def balancer_config(nameserver: str, loop: str) -> dict:
    return {
        "loop": loop,
        "listeners": [{"name": "web", "bind": "0.0.0.0:8080", "upstream": "app"}],
        # The network's own DNS server, named as compose's config names Docker's 127.0.0.11.
        # A short hold: a lookup that fails for more than a few seconds is a fault this test
        # must see (it was the bridge's MAC changing, and a full conntrack table: Network).
        "resolvers": {"nameservers": [nameserver], "interval": "1s", "timeout": "1s",
                      "hold": "5s"},
        "upstreams": {"app": {
            "strategy": "round_robin",
            "servers": [{"discover": "app:3000"}],
            # A replica is in DNS as soon as its container starts, a moment before its app
            # listens, and a stopped one refuses until the next lookup drops it: each such
            # connect is retried on another replica, and the client never knows.
            "retries": {"tries": 3},
            "timeouts": {"connect": "1s"},
            "health": {"max_fails": 3, "fail_timeout": "2s"},
        }},
        "metrics": {"bind": "0.0.0.0:9100"},  # what the image's HEALTHCHECK asks
        "shutdown_timeout": "5s",
    }


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_replicas_scaled_up_and_down_under_a_connecting_client(network: Network, tmp_path: Path,
                                                               loop: str) -> None:
    config = tmp_path / "balancer.yaml"
    config.write_text(yaml.safe_dump(balancer_config(network.gateway(), loop)))
    config.chmod(0o644)
    apps = [network.app("app1"), network.app("app2")]
    balancer = network.run("balancer", ["--network-alias", "balancer", "-v",
                                        f"{config}:/etc/balancer/balancer.yaml:ro"],
                           ["-c", "/etc/balancer/balancer.yaml"])
    network.wait_for_log(balancer, r"listening on 0\.0\.0\.0:8080")
    network.wait_for_log(balancer, r"upstream app: .*\+.*\+.*\(dns app\)")
    # The Dockerfile's HEALTHCHECK, run by podman inside the container: /healthz says 200.
    assert podman("healthcheck", "run", balancer, check=False).returncode == 0

    client = Client(network)
    started = time.monotonic()
    try:
        client.wait(lambda: {"app1", "app2"} <= set(client.served()))
        apps += [network.app("app3"), network.app("app4")]  # scale 2 -> 4
        client.wait(lambda: {"app3", "app4"} <= set(client.served()))

        leaving = network.address(apps[0])
        podman("stop", "-t", "10", apps[0])  # scale 4 -> 3: SIGTERM, as compose does
        network.wait_for_log(balancer, rf"-{re.escape(leaving)}:3000")
        after = len(client.served())
        client.wait(lambda: len(client.served()) >= after + 100)
    finally:
        client.stop()
    took = time.monotonic() - started

    served = client.served()
    assert set(served) == {"app1", "app2", "app3", "app4"}
    assert client.failures() == [], client.failures()[:10]
    assert client.lines[-1] == "done"
    assert client.lines[0].startswith("resolved ")
    assert set(served[after:]) == {"app2", "app3", "app4"}, "the others share the load"
    log = network.logs(balancer)
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]
    print(f"{len(served)} connections in {took:.1f} s, 0 failed; per replica: "
          f"{ {name: served.count(name) for name in sorted(set(served))} }")
