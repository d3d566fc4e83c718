"""`balancer rollout NAME -c FILE`: ask the running balancer to roll an upstream's instances.

The balancer does the work (apps.py); this command only asks for it on the admin endpoint
(`POST /upstreams/NAME/rollout`, with `metrics.admin_token` when set), then follows
`/status` until the rollout is done or failed, printing its progress. Returns an exit code
for cli.py: 0 done, 1 failed (or no answer), 2 when the config has no admin endpoint.
"""

from __future__ import annotations

import http.client
import json
import time
from typing import Any
from urllib.parse import quote

from .config import Config

POLL_INTERVAL = 0.2  # seconds between looks at /status while following
REQUEST_TIMEOUT = 5.0


class AdminError(Exception):
    """The admin endpoint could not be reached or refused the request."""


def admin_target(config: Config) -> tuple[str, int, str | None]:
    """(host to connect to, port, token); a wildcard bind is reached on loopback."""
    assert config.metrics is not None
    bind = config.metrics.bind
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(bind.host, bind.host)
    return host, bind.port, config.metrics.admin_token


def request(config: Config, method: str, path: str) -> tuple[int, Any]:
    """One request to the admin endpoint: (status, decoded JSON body or text)."""
    host, port, token = admin_target(config)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    connection = http.client.HTTPConnection(host, port, timeout=REQUEST_TIMEOUT)
    try:
        connection.request(method, path, headers=headers)
        response = connection.getresponse()
        body = response.read().decode(errors="replace")
    except OSError as exc:
        raise AdminError(f"cannot reach the admin endpoint on {host}:{port}: {exc}") from None
    finally:
        connection.close()
    try:
        return response.status, json.loads(body)
    except ValueError:
        return response.status, body.strip()


def run_rollout(config: Config, upstream: str, timeout: float | None, say: Any) -> int:
    """Start a rollout of `upstream` and follow it; `say` prints one line."""
    if config.metrics is None:
        say("rollout needs the admin endpoint: set metrics.bind in the config")
        return 2
    up = config.upstreams.get(upstream)
    if up is None or up.run is None:
        say(f"upstream {upstream!r} has no run section in this config")
        return 2
    if timeout is None:  # every instance may take its whole ready, drain and kill times
        per = up.run.ready_timeout + config.shutdown_timeout + up.run.kill_timeout
        timeout = per * max(up.run.count, 1) + 10
    try:
        status, body = request(config, "POST", f"/upstreams/{quote(upstream, safe='')}/rollout")
        if status == 409:
            say(f"a rollout of {upstream} is already running; following it")
        elif status != 202:
            error = body.get("error") if isinstance(body, dict) else body
            say(f"rollout refused ({status}): {error}")
            return 1
        return _follow(config, upstream, time.monotonic() + timeout, say)
    except AdminError as exc:
        say(str(exc))
        return 1


def _follow(config: Config, upstream: str, deadline: float, say: Any) -> int:
    shown = -1
    while time.monotonic() < deadline:
        status, body = request(config, "GET", "/status")
        rollout = (body.get("upstreams", {}).get(upstream, {}).get("rollout", {})
                   if status == 200 and isinstance(body, dict) else {})
        done = rollout.get("done", 0)
        if done != shown and rollout.get("state") == "running":
            say(f"rollout of {upstream}: {done}/{rollout.get('total')} instance(s) replaced")
            shown = done
        if rollout.get("state") == "done":
            say(f"rollout of {upstream} done: {rollout.get('total')} instance(s) replaced in "
                f"{rollout.get('duration')}s")
            return 0
        if rollout.get("state") == "failed":
            say(f"rollout of {upstream} failed: {rollout.get('error')} (the old instances "
                "keep serving)")
            return 1
        time.sleep(POLL_INTERVAL)
    say(f"rollout of {upstream} still running after the timeout; see /status")
    return 1
