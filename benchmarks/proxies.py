"""Config generation and start-up for the backends and each proxy under test.

All proxies get the same topology: one loopback listener, least-connections over the
given upstream servers, one worker/thread, pinned to CPU 0, no logging on the data path.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from .procs import CPU_LOAD, CPU_PROXY, Proc, Supervisor, free_port, wait_port

REPO = Path(__file__).resolve().parent.parent
PROXIES = ("direct", "haproxy", "nginx", "balancer")
# Enough for 2,000 idle pairs or wrk -c1000 (two fds per proxied connection) plus slack.
MAX_CONN = 8000
NOFILE = 20000
STREAM_MODULE_PATHS = (
    "/usr/lib/nginx/modules/ngx_stream_module.so",
    "/usr/lib64/nginx/modules/ngx_stream_module.so",
    "/usr/local/nginx/modules/ngx_stream_module.so",
)


def stream_module() -> str | None:
    """Path of nginx's dynamic stream module, or None if nginx has it built in or lacks it."""
    for path in STREAM_MODULE_PATHS:
        if Path(path).exists():
            return path
    return None


def nginx_has_stream() -> bool:
    """True if nginx can run a `stream {}` block (dynamic module present or built in)."""
    import subprocess

    if stream_module():
        return True
    if not shutil.which("nginx"):
        return False
    out = subprocess.run(["nginx", "-V"], capture_output=True, text=True, check=False)
    return "--with-stream" in out.stderr.split()


def _nginx_dirs(prefix: Path) -> None:
    for sub in ("logs", "tmp"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)


def start_nginx_backend(sup: Supervisor, workdir: Path, index: int) -> tuple[Proc, int]:
    """An nginx returning 200 "ok" on a port of its own, single process, on CPU 1."""
    port = free_port()
    prefix = workdir / f"backend{index}"
    _nginx_dirs(prefix)
    conf = prefix / "nginx.conf"
    conf.write_text(f"""\
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile {NOFILE};
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections {MAX_CONN}; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    keepalive_timeout 600s;
    keepalive_requests 100000000;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{ return 200 "ok"; }}
    }}
}}
""")
    cmd = ["nginx", "-p", str(prefix), "-e", f"{prefix}/logs/error.log", "-c", str(conf)]
    proc = sup.start(f"backend{index}", cmd, CPU_LOAD)
    wait_port(port, 10, proc.popen, proc.log)
    return proc, port


def start_iperf_server(sup: Supervisor) -> tuple[Proc, int]:
    """An iperf3 server on CPU 1: the upstream for the bulk test."""
    port = free_port()
    proc = sup.start("iperf3-server", ["iperf3", "-s", "-p", str(port), "-B", "127.0.0.1"],
                     CPU_LOAD)
    wait_port(port, 10, proc.popen, proc.log)
    return proc, port


@dataclass(frozen=True)
class Variant:
    """One proxy setup to measure; `big_buffers` is the 256 KiB-buffer bulk variant."""

    proxy: str
    big_buffers: bool = False

    @property
    def label(self) -> str:
        return f"{self.proxy} (256k buf)" if self.big_buffers else self.proxy


def haproxy_conf(port: int, upstreams: list[int], big_buffers: bool, bind_extra: str = "") -> str:
    """HAProxy's benchmark config; `bind_extra` adds words to its `bind` line (`ssl crt F`)."""
    servers = "\n".join(f"    server s{i} 127.0.0.1:{p}" for i, p in enumerate(upstreams))
    tune = "    tune.bufsize 262144\n" if big_buffers else ""
    return f"""\
global
    nbthread 1
    maxconn {MAX_CONN}
{tune}defaults
    mode tcp
    timeout connect 2s
    timeout client 10m
    timeout server 10m
    maxconn {MAX_CONN}
frontend bench
    bind 127.0.0.1:{port}{bind_extra} backlog 4096
    default_backend app
backend app
    balance leastconn
{servers}
"""


def nginx_stream_conf(prefix: Path, port: int, upstreams: list[int],
                      big_buffers: bool) -> str:
    module = stream_module()
    load = f"load_module {module};\n" if module else ""
    servers = "\n".join(f"        server 127.0.0.1:{p};" for p in upstreams)
    buf = "        proxy_buffer_size 256k;\n" if big_buffers else ""
    return f"""\
{load}daemon off;
master_process on;
user root;
worker_processes 1;
worker_rlimit_nofile {NOFILE};
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections {MAX_CONN}; }}
stream {{
    upstream app {{
        least_conn;
{servers}
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        proxy_pass app;
        proxy_connect_timeout 2s;
        proxy_timeout 10m;
{buf}    }}
}}
"""


def balancer_conf(port: int, upstreams: list[int], listener_extra: str = "") -> str:
    """The balancer's benchmark config; `listener_extra` adds keys to the listener (indented
    four spaces, e.g. a `tls:` block)."""
    servers = "\n".join(f"      - address: 127.0.0.1:{p}" for p in upstreams)
    return f"""\
listeners:
  - name: bench
    bind: 127.0.0.1:{port}
    upstream: app
{listener_extra}upstreams:
  app:
    strategy: least_conn
    servers:
{servers}
    timeouts: {{connect: 2s, idle: 10m}}
workers: 1
loop: uvloop
"""


def balancer_command(template: str | None, config: Path) -> list[str]:
    """The default `<venv python> -m balancer -c FILE`, or the user's `--balancer-cmd`.

    In a template `{config}` is replaced by the config path; without it `-c FILE` is appended.
    """
    if not template:
        return [sys.executable, "-m", "balancer", "-c", str(config), "-v", "warning"]
    if "{config}" in template:
        return shlex.split(template.replace("{config}", shlex.quote(str(config))))
    return [*shlex.split(template), "-c", str(config)]


def start_proxy(sup: Supervisor, workdir: Path, variant: Variant, upstreams: list[int],
                balancer_cmd: str | None, run_id: str) -> tuple[Proc | None, int]:
    """Start one proxy in front of `upstreams`; `direct` means no proxy (first upstream)."""
    if variant.proxy == "direct":
        return None, upstreams[0]
    port = free_port()
    prefix = workdir / f"{variant.proxy}-{run_id}"
    prefix.mkdir(parents=True, exist_ok=True)
    cwd = None
    if variant.proxy == "haproxy":
        conf = prefix / "haproxy.cfg"
        conf.write_text(haproxy_conf(port, upstreams, variant.big_buffers))
        cmd = ["haproxy", "-db", "-f", str(conf)]
    elif variant.proxy == "nginx":
        _nginx_dirs(prefix)
        conf = prefix / "nginx.conf"
        conf.write_text(nginx_stream_conf(prefix, port, upstreams, variant.big_buffers))
        cmd = ["nginx", "-p", str(prefix), "-e", f"{prefix}/logs/error.log", "-c", str(conf)]
    elif variant.proxy == "balancer":
        conf = prefix / "balancer.yaml"
        conf.write_text(balancer_conf(port, upstreams))
        cmd = balancer_command(balancer_cmd, conf)
        cwd = str(REPO)
    else:
        raise ValueError(f"unknown proxy {variant.proxy!r}")
    proc = sup.start(variant.proxy, cmd, CPU_PROXY, cwd=cwd)
    try:
        wait_port(port, 20, proc.popen, proc.log)
    except Exception:
        sup.stop(proc)
        raise
    return proc, port
