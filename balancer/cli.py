"""The `balancer` command: arguments, subcommands and exit codes.

This is the only module that exits. Exit codes: 0 ok, 1 runtime failure (e.g. a port that
cannot be bound), 2 bad usage or an invalid configuration.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .config import LOOPS, Config, ConfigError, config_warnings, load_config

if TYPE_CHECKING:
    from .watch import ConfigWatcher

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_CONFIG = 2

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="balancer",
        description="A layer-4 (TCP) load balancer. Run `balancer -c FILE` to serve a config.",
    )
    parser.add_argument("--version", action="version", version=f"balancer {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", metavar="FILE", help="configuration file (YAML)")
    common.add_argument(
        "-v", "--log-level", choices=LOG_LEVELS, default="info", metavar="LEVEL",
        help="log level: debug, info, warning or error (default: info)",
    )
    common.add_argument(
        "--loop", choices=LOOPS,
        help="event loop, overriding the config's `loop` (default: from config, auto)",
    )
    common.add_argument(
        "--workers", metavar="N", help="worker processes (a number or auto), overriding the "
        "config's `workers`",
    )
    common.add_argument(
        "--pid-file", metavar="PATH",
        help="write the main process id here (run), or signal the process found here (reload)",
    )
    common.add_argument(
        "--watch-config", action="store_true",
        help="reload when the config file's content changes (a Kubernetes ConfigMap update), "
        "as on SIGHUP; the config's `watch_config: true` does the same",
    )
    # The top-level parser accepts the run options too, so `balancer -c FILE` just runs.
    for action in common._actions:
        parser._add_action(action)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("run", parents=[common], help="serve a configuration (the default)")
    sub.add_parser("check", parents=[common], help="validate a configuration and exit")
    sub.add_parser(
        "reload", parents=[common],
        help="validate a configuration, then tell the running balancer (--pid-file) to load it",
    )
    rollout = sub.add_parser(
        "rollout", parents=[common],
        help="replace an upstream's app instances one at a time, without dropping a "
             "connection (asks the running balancer's admin endpoint, as pm2 reload)",
    )
    rollout.add_argument("upstream", metavar="NAME", help="the upstream whose run section "
                         "to roll out")
    rollout.add_argument("--timeout", type=float, metavar="SECONDS",
                         help="give up following it after this long (default: from the config)")
    demo = sub.add_parser(
        "demo", parents=[common], help="start sample backends and a balancer in front of them"
    )
    demo.add_argument("--requests", type=int, default=6, help="requests to send at start")
    top = sub.add_parser(
        "top", parents=[common],
        help="the status table in the terminal, refreshed every second (reads /status)",
    )
    top.add_argument("--url", help="the admin endpoint, e.g. http://127.0.0.1:9100 "
                     "(default: metrics.bind of -c FILE)")
    top.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                     help="seconds between refreshes (default: 1)")
    top.add_argument("--once", action="store_true", help="print the table once and exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT, stream=sys.stderr)
    command = args.command or "run"
    if command == "demo":
        from .demo.command import run_demo

        return run_demo(loop=args.loop or "auto", requests=args.requests)
    if command == "top":
        return _top(parser, args)
    if not args.config:
        parser.error("the following arguments are required: -c/--config")
    watcher = None
    if command == "run":  # its baseline is read before the load: no change goes unseen
        from .watch import ConfigWatcher

        watcher = ConfigWatcher(args.config, always=args.watch_config)
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    if command in ("check", "reload"):
        for warning in config_warnings(config):  # allowed, but probably not meant
            print(f"warning: {warning}", file=sys.stderr)
    if command == "check":
        print("configuration ok")
        return EXIT_OK
    if command == "reload":
        return _signal_reload(args.pid_file)
    if command == "rollout":
        from .rollout import run_rollout

        return run_rollout(config, args.upstream, args.timeout,
                           lambda line: print(line, flush=True))
    if args.loop:
        config = dataclasses.replace(config, loop=args.loop)
    if args.workers:
        workers = _parse_workers(args.workers)
        if workers == 0:
            parser.error("--workers: must be a positive integer or auto")
        config = dataclasses.replace(config, workers=workers)
    return _serve(config, args.config, args.pid_file, watcher)


def _top(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from . import top

    url = args.url
    if url is None:
        if not args.config:
            parser.error("top needs --url or -c/--config")
        config = _load(args.config)
        if config is None:
            return EXIT_CONFIG
        try:
            url = top.url_of(config)
        except top.Unreachable as exc:
            print(f"balancer top: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    if args.interval <= 0:
        parser.error("--interval: must be a positive number of seconds")
    return top.run(url, args.interval, args.once)


def _parse_workers(text: str) -> int | None:
    """`auto` -> None (one per usable CPU); a positive integer; 0 means invalid."""
    if text == "auto":
        return None
    return int(text) if text.isdigit() and text.isascii() else 0


def _signal_reload(pid_file: str | None) -> int:
    """Send SIGHUP to the balancer whose pid is in `pid_file` (the config was valid)."""
    import os
    import signal

    if not pid_file:
        print("reload needs --pid-file (the file the running balancer was started with)",
              file=sys.stderr)
        return EXIT_CONFIG
    try:
        pid = int(Path(pid_file).read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as exc:
        print(f"cannot signal the balancer from {pid_file}: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    print(f"configuration ok; reload signalled to pid {pid}")
    return EXIT_OK


def _load(path: str) -> Config | None:
    """Load and validate; print every problem to stderr on failure."""
    try:
        return load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return None


def _serve(config: Config, config_path: str, pid_file: str | None,
           watcher: ConfigWatcher | None) -> int:
    workers = config.workers if config.workers is not None else _usable_cpus()
    try:
        if workers > 1:
            from .proc.supervisor import run_supervisor

            return run_supervisor(config, config_path, workers, pid_file, watcher)
        from .server import run

        return run(config, config_path=config_path, pid_file=pid_file, watcher=watcher)
    except OSError as exc:
        logging.getLogger("balancer").error("cannot start: %s", exc)
        return EXIT_RUNTIME
    except RuntimeError as exc:  # e.g. loop: uvloop requested but not installed
        logging.getLogger("balancer").error("cannot start: %s", exc)
        return EXIT_RUNTIME


def _usable_cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())
