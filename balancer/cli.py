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

from . import __version__
from .config import Config, ConfigError, load_config

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
        "--loop", choices=("auto", "uvloop", "asyncio"),
        help="event loop, overriding the config's `loop` (default: from config, auto)",
    )
    # The top-level parser accepts the run options too, so `balancer -c FILE` just runs.
    for action in common._actions:
        parser._add_action(action)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("run", parents=[common], help="serve a configuration (the default)")
    sub.add_parser("check", parents=[common], help="validate a configuration and exit")
    demo = sub.add_parser(
        "demo", parents=[common], help="start sample backends and a balancer in front of them"
    )
    demo.add_argument("--requests", type=int, default=6, help="requests to send at start")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT, stream=sys.stderr)
    command = args.command or "run"
    if command == "demo":
        from .demo import run_demo

        return run_demo(loop=args.loop or "auto", requests=args.requests)
    if not args.config:
        parser.error("the following arguments are required: -c/--config")
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    if command == "check":
        print("configuration ok")
        return EXIT_OK
    if args.loop:
        config = dataclasses.replace(config, loop=args.loop)
    return _serve(config)


def _load(path: str) -> Config | None:
    """Load and validate; print every problem to stderr on failure."""
    try:
        return load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return None


def _serve(config: Config) -> int:
    from .server import run

    try:
        return run(config)
    except OSError as exc:
        logging.getLogger("balancer").error("cannot start: %s", exc)
        return EXIT_RUNTIME
    except RuntimeError as exc:  # e.g. loop: uvloop requested but not installed
        logging.getLogger("balancer").error("cannot start: %s", exc)
        return EXIT_RUNTIME


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())
