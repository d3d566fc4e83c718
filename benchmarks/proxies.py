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


def nginx_http_backend(prefix: Path, listens: list[str], extra: str = "") -> list[str]:
    """Write a one-process nginx under `prefix` answering 200 "ok" on every `listen` line
    (`extra`: more http-level directives); returns the command that runs it."""
    _nginx_dirs(prefix)
    conf = prefix / "nginx.conf"
    listen_lines = "\n".join(f"        listen {listen};" for listen in listens)
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
{extra}    server {{
{listen_lines}
        location / {{ return 200 "ok"; }}
    }}
}}
""")
    return ["nginx", "-p", str(prefix), "-e", f"{prefix}/logs/error.log", "-c", str(conf)]


def start_nginx_backend(sup: Supervisor, workdir: Path, index: int,
                        proxy_protocol: bool = False) -> tuple[Proc, int]:
    """An nginx returning 200 "ok" on a port of its own, single process, on CPU 1;
    `proxy_protocol`: every connection must begin with a PROXY header (for `send_proxy`)."""
    port = free_port()
    listen_extra = " proxy_protocol" if proxy_protocol else ""
    cmd = nginx_http_backend(
        workdir / f"backend{index}", [f"127.0.0.1:{port}{listen_extra} backlog=4096"],
        "    keepalive_timeout 600s;\n    keepalive_requests 100000000;\n")
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


# Bulk and TLS setups besides the plain one: the suffix of the result key and of the label.
FLAVORS = {
    "256k": "256k buf",  # tune.bufsize 262144 / proxy_buffer_size 256k
    "splice": "splice-auto",  # HAProxy's option splice-auto: its best bulk configuration
    "tls": "TLS",  # TLS termination with the same RSA-2048 certificate
}


@dataclass(frozen=True)
class Variant:
    """One proxy setup to measure.

    `flavor` is "" or a key of FLAVORS; `source` is a directory holding another revision's
    `balancer/` package (a `balancer@REV` row, for before/after runs in one invocation).
    """

    proxy: str
    flavor: str = ""
    source: Path | None = None

    @property
    def kind(self) -> str:
        """The proxy program: `balancer@REV` rows run the balancer."""
        return "balancer" if self.proxy.startswith("balancer") else self.proxy

    @property
    def label(self) -> str:
        return f"{self.proxy} ({FLAVORS[self.flavor]})" if self.flavor else self.proxy

    def key(self, test: str) -> str:
        """Where this variant's runs go in the results: `bulk_splice`, `conn`..."""
        return f"{test}_{self.flavor}" if self.flavor and self.flavor != "tls" else test


def haproxy_conf(port: int, upstreams: list[int], big_buffers: bool, bind_extra: str = "",
                 splice: bool = False) -> str:
    """HAProxy's benchmark config; `bind_extra` adds words to its `bind` line (`ssl crt F`);
    `splice` turns on `option splice-auto` (kernel splice when it judges it worth it)."""
    servers = "\n".join(f"    server s{i} 127.0.0.1:{p}" for i, p in enumerate(upstreams))
    tune = "    tune.bufsize 262144\n" if big_buffers else ""
    option = "    option splice-auto\n" if splice else ""
    if splice:  # pipes count against the descriptor limit: maxconn/4 of them would not fit
        tune += "    maxpipes 1024\n"
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
{option}frontend bench
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


def haproxy_tls_conf(port: int, upstreams: list[int], both: Path) -> str:
    return haproxy_conf(port, upstreams, False, f" ssl crt {both}")


def balancer_tls_conf(port: int, upstreams: list[int], cert: Path, key: Path) -> str:
    tls = f"    tls:\n      certificates: [{{cert: {cert}, key: {key}}}]\n"
    return balancer_conf(port, upstreams, tls)


def make_certificate(workdir: Path) -> tuple[Path, Path, Path]:
    """A self-signed RSA-2048 certificate: (cert, key, both in one file for HAProxy)."""
    import subprocess

    cert, key, both = workdir / "bench.pem", workdir / "bench.key", workdir / "both.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=bench.local",
                    "-addext", "subjectAltName=DNS:bench.local"],
                   check=True, capture_output=True)
    both.write_bytes(cert.read_bytes() + key.read_bytes())
    return cert, key, both


def start_proxy(sup: Supervisor, workdir: Path, variant: Variant, upstreams: list[int],
                balancer_cmd: str | None, run_id: str,
                tls_files: tuple[Path, Path, Path] | None = None) -> tuple[Proc | None, int]:
    """Start one proxy in front of `upstreams`; `direct` means no proxy (first upstream)."""
    if variant.proxy == "direct":
        return None, upstreams[0]
    tls = variant.flavor == "tls"
    if tls and tls_files is None:
        raise ValueError("a TLS variant needs the certificate files")
    port = free_port()
    prefix = workdir / f"{variant.proxy}-{run_id}"
    prefix.mkdir(parents=True, exist_ok=True)
    cwd = None
    if variant.kind == "haproxy":
        conf = prefix / "haproxy.cfg"
        if tls:
            assert tls_files is not None
            conf.write_text(haproxy_tls_conf(port, upstreams, tls_files[2]))
        else:
            conf.write_text(haproxy_conf(port, upstreams, variant.flavor == "256k",
                                         splice=variant.flavor == "splice"))
        cmd = ["haproxy", "-db", "-f", str(conf)]
    elif variant.kind == "nginx":
        _nginx_dirs(prefix)
        conf = prefix / "nginx.conf"
        conf.write_text(nginx_stream_conf(prefix, port, upstreams, variant.flavor == "256k"))
        cmd = ["nginx", "-p", str(prefix), "-e", f"{prefix}/logs/error.log", "-c", str(conf)]
    elif variant.kind == "balancer":
        conf = prefix / "balancer.yaml"
        if tls:
            assert tls_files is not None
            conf.write_text(balancer_tls_conf(port, upstreams, tls_files[0], tls_files[1]))
        else:
            conf.write_text(balancer_conf(port, upstreams))
        # Another revision runs from its own tree: `-m balancer` imports from the cwd first.
        cmd = balancer_command(None if variant.source else balancer_cmd, conf)
        cwd = str(variant.source or REPO)
    else:
        raise ValueError(f"unknown proxy {variant.proxy!r}")
    proc = sup.start(variant.proxy, cmd, CPU_PROXY, cwd=cwd)
    try:
        wait_port(port, 20, proc.popen, proc.log)
    except Exception:
        sup.stop(proc)
        raise
    return proc, port
