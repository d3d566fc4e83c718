"""DNS service discovery: the servers of `discover:` items, looked up while serving.

One task per discovered name, in the primary process only (workers follow its answer
through membership.py), re-resolves the name every `resolvers.interval` with dnspython's
asyncio resolver and hands what it found to `Membership.update(upstream, "dns NAME", ...)`,
which diffs, logs and applies it like a reload. Nothing here runs on the data path, and a
lookup never blocks the loop (dnspython's asyncio backend: UDP, TCP when truncated).

- ``NAME:PORT``: the A and AAAA records, each address a server on PORT.
- ``_service._proto.NAME`` (HAProxy's rule: a leading ``_``): the SRV records, each target
  resolved through the same nameservers; the record's port and weight (clamped to 1..256)
  become the server's. Records of a higher priority than the lowest become backups.
- A failed lookup (timeout, SERVFAIL, nameserver down) keeps the last good answer for
  `hold`, then the entry is emptied; NXDOMAIN or no records from a working nameserver are
  believed after `hold` too (a whole service can go away). Each change of state is said once.
- At most MAX_SERVERS servers from one name, the lowest addresses (every balancer keeps the
  same ones); a bigger answer is cut and said once. In an ip_hash upstream on the ring
  (`hash: ring`, 160 points per unit of weight), one name's weights are scaled down (in
  proportion, at least 1 each) to a total of MAX_IP_HASH_WEIGHT, as the file's servers are
  capped; Maglev's table has the same size whatever the weights.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from .config import (
    MAX_IP_HASH_WEIGHT,
    MAX_WEIGHT,
    Address,
    Config,
    DiscoverConfig,
    ResolversConfig,
    ServerConfig,
)

log = logging.getLogger("balancer.discovery")

MAX_SERVERS = 256  # from one name; a bigger answer is cut
MAX_TARGETS = 32  # SRV targets looked up at the same time
SHOWN_ERROR = 200  # characters of a resolver's error kept for the log

# Membership.update: replace what `source` contributes to `upstream`.
Update = Callable[[str, str, Sequence[ServerConfig]], None]


class LookupFailed(Exception):
    """No usable answer: timeout, SERVFAIL, refused, no nameserver reachable."""


@dataclass(frozen=True, order=True)
class Found:
    """One server an answer names: an address, and for SRV its port, weight and priority."""

    sort_key: tuple[int, int, int]  # (IP version, address, port): the order every balancer cuts
    host: str
    port: int | None = None
    weight: int = 1
    backup: bool = False


def found(host: str, port: int | None = None, weight: int = 1, backup: bool = False) -> Found:
    address = ipaddress.ip_address(host)
    return Found((address.version, int(address), port or 0), address.compressed, port,
                 weight, backup)


@dataclass(frozen=True)
class Answer:
    """What one lookup of a name gave: servers, or why none (`problem`) and whether the
    lookup itself failed (no nameserver answered) rather than said there is nothing."""

    found: tuple[Found, ...] = ()
    problem: str | None = None
    failed: bool = False
    cut: int = 0  # records beyond MAX_SERVERS, dropped


class Resolver:
    """dnspython's asyncio resolver, set up from `resolvers` (or /etc/resolv.conf)."""

    def __init__(self, config: ResolversConfig) -> None:
        self.config = config
        self.broken: str | None = None  # why no lookup can work (no nameserver known)
        self.search = not config.nameservers  # the system's search domains (app -> app.ns...)
        if config.nameservers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port)
                                    for host, port in config.nameservers]
        else:
            try:  # a small local file, read once per (re)load
                resolver = dns.asyncresolver.Resolver()
            except dns.exception.DNSException as exc:
                resolver = dns.asyncresolver.Resolver(configure=False)
                self.broken = f"/etc/resolv.conf: {exc} (set resolvers.nameservers)"
        resolver.timeout = config.timeout
        resolver.lifetime = config.timeout  # per query, whatever the number of nameservers
        resolver.retry_servfail = False
        resolver.cache = None
        self.resolver = resolver

    async def lookup(self, entry: DiscoverConfig) -> Answer:
        """Look `entry` up once; never raises for what the DNS said or did not say."""
        try:
            if self.broken is not None:
                raise LookupFailed(self.broken)
            if entry.srv:
                records = await self._srv(entry.name)
            else:
                records = await self._addresses(entry.name)
        except LookupFailed as exc:
            return Answer(problem=str(exc), failed=True)
        if not records:
            return Answer(problem="no records" if records is not None else "NXDOMAIN")
        unique = sorted({(f.host, f.port): f for f in reversed(records)}.values())
        return Answer(tuple(unique[:MAX_SERVERS]), cut=max(0, len(unique) - MAX_SERVERS))

    async def _query(self, name: str, rdtype: dns.rdatatype.RdataType) -> list[Any] | None:
        """The records of one type; [] for none, None for NXDOMAIN."""
        try:
            answer = await self.resolver.resolve(name, rdtype, search=self.search,
                                                 raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return None
        except dns.resolver.LifetimeTimeout:
            raise LookupFailed(f"timed out after {self.config.timeout:g}s") from None
        except (dns.exception.DNSException, OSError) as exc:
            raise LookupFailed(str(exc)[:SHOWN_ERROR] or type(exc).__name__) from None
        return list(answer.rrset) if answer.rrset is not None else []

    async def _addresses(self, name: str) -> list[Found] | None:
        """A and AAAA together; None when the name does not exist at all."""
        results = await asyncio.gather(self._query(name, dns.rdatatype.A),
                                       self._query(name, dns.rdatatype.AAAA),
                                       return_exceptions=True)
        records: list[Any] = []
        exists = False
        for result in results:
            if isinstance(result, BaseException):
                raise result
            if result is not None:
                exists = True
                records.extend(result)
        return [found(rdata.address) for rdata in records] if exists else None

    async def _srv(self, name: str) -> list[Found] | None:
        records = await self._query(name, dns.rdatatype.SRV)
        if records is None:
            return None
        # Lowest priority first, then heaviest: the first MAX_SERVERS are the ones to keep.
        records.sort(key=lambda r: (r.priority, -r.weight, str(r.target), r.port))
        records = [r for r in records if str(r.target) != "."][:MAX_SERVERS]
        if not records:
            return []
        lowest = records[0].priority
        targets = list(dict.fromkeys(str(r.target) for r in records))
        limit = asyncio.Semaphore(MAX_TARGETS)

        async def addresses(target: str) -> list[Found]:
            async with limit:
                return await self._addresses(target) or []  # NXDOMAIN target: no servers

        results = await asyncio.gather(*(addresses(t) for t in targets), return_exceptions=True)
        by_target: dict[str, list[Found]] = {}
        for target, result in zip(targets, results, strict=True):
            if isinstance(result, BaseException):
                raise result
            by_target[target] = result
        return [found(address.host, r.port, min(max(r.weight, 1), MAX_WEIGHT),
                      r.priority != lowest)
                for r in records for address in by_target[str(r.target)]]


def servers_of(entry: DiscoverConfig, answer: Sequence[Found],
               budget: int | None = None) -> tuple[ServerConfig, ...]:
    """The servers an answer gives, with the item's other keys applied to each; weights
    scaled down to a total of `budget`, if given and exceeded."""
    weights = [f.weight if entry.srv else entry.weight for f in answer]
    total = sum(weights)
    if budget is not None and total > budget:
        weights = [max(1, weight * budget // total) for weight in weights]
    return tuple(
        ServerConfig(Address(f.host, f.port if f.port is not None else entry.port or 0),
                     weight=weight, max_conns=entry.max_conns, backup=entry.backup or f.backup,
                     send_proxy=entry.send_proxy, source=entry.source)
        for f, weight in zip(answer, weights, strict=True))


class NameWatch:
    """One discovered name of one upstream, re-resolved every interval."""

    def __init__(self, upstream: str, entry: DiscoverConfig, resolver: Resolver,
                 update: Update, budget: int | None = None) -> None:
        self.upstream = upstream
        self.entry = entry
        self.budget = budget  # the total weight its servers may have (ip_hash), if bounded
        self.resolver = resolver
        self.update = update
        self.found: tuple[Found, ...] = ()  # the answer in use
        self.published: tuple[ServerConfig, ...] | None = None
        self.good_at: float | None = None  # when a lookup last gave servers
        self.trouble: str | None = None  # what the last lookups said instead, once logged
        self.emptied = False  # `hold` ran out and the entry was emptied (said once)
        self.cut = 0
        self.first = asyncio.Event()  # the first lookup is done (start() waits for it)
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(
            self._run(), name=f"discover {self.upstream} {self.entry.name}")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # a bug must not end the watch: the name stays followed
                log.exception("dns %s: unexpected error in a lookup", self.entry.name)
            self.first.set()
            await asyncio.sleep(self.resolver.config.interval)

    async def refresh(self) -> None:
        """One lookup, and what it means for the servers in use."""
        answer = await self.resolver.lookup(self.entry)
        name = self.entry.name
        if answer.found:
            if self.trouble is not None:
                log.info("dns %s: answers again (%d server(s))", name, len(answer.found))
            self.trouble = None
            self.emptied = False
            self.good_at = time.monotonic()
            self.found = answer.found
            self._say_cut(answer.cut)
        else:
            self._hold(answer)
        self.publish()

    def _hold(self, answer: Answer) -> None:
        """No servers in this answer: keep the last good one until `hold` has passed."""
        name, hold = self.entry.name, self.resolver.config.hold
        problem = answer.problem or "no records"
        what = "lookup failed" if answer.failed else "answer empty"
        if self.good_at is None or time.monotonic() - self.good_at >= hold:
            if not self.emptied:
                if self.found:
                    log.warning("dns %s: %s (%s) for %gs: no servers from it in upstream %s now",
                                name, what, problem, hold, self.upstream)
                else:
                    log.warning("dns %s: %s (%s): no servers from it in upstream %s yet",
                                name, what, problem, self.upstream)
                self.emptied = True
            self.found = ()
        elif self.trouble is None:
            log.warning("dns %s: %s (%s): keeping the last answer (%d server(s)) for up to %gs",
                        name, what, problem, len(self.found), hold)
        self.trouble = problem

    def _say_cut(self, cut: int) -> None:
        if cut and not self.cut:
            log.warning("dns %s: answer of %d servers cut to the first %d by address",
                        self.entry.name, cut + MAX_SERVERS, MAX_SERVERS)
        self.cut = cut

    def publish(self) -> None:
        """Hand the servers in use to membership, when they changed (or the item did)."""
        servers = servers_of(self.entry, self.found, self.budget)
        if servers != self.published:
            self.published = servers
            self.update(self.upstream, self.entry.source, servers)


class DnsDiscovery:
    """The membership Source of every `discover:` item: one NameWatch per (upstream, name)."""

    def __init__(self, update: Update) -> None:
        self.update = update
        self.watches: dict[tuple[str, str], NameWatch] = {}
        self.resolver: Resolver | None = None
        self.stopping: set[asyncio.Task[None]] = set()  # watches of removed items, cancelled

    async def start(self, config: Config) -> None:
        """Start every watch and wait (bounded) for their first answers, so the listeners
        open with the servers DNS knows of already."""
        self.reconfigure(config)
        waits = [asyncio.ensure_future(w.first.wait()) for w in self.watches.values()]
        if waits:
            # An SRV lookup is two rounds of queries (records, then targets), each bounded.
            _, pending = await asyncio.wait(waits, timeout=2 * config.resolvers.timeout + 1)
            for wait in pending:
                wait.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def reconfigure(self, config: Config) -> None:
        """Follow a reloaded file: new items start, removed ones stop and take their servers
        with them, changed keys apply at once to the answer in use."""
        wanted = {(upstream.name, entry.name): entry
                  for upstream in config.upstreams.values() for entry in upstream.discover}
        budgets = {name: MAX_IP_HASH_WEIGHT
                   if upstream.strategy == "ip_hash" and upstream.hash == "ring" else None
                   for name, upstream in config.upstreams.items()}
        if wanted and (self.resolver is None or self.resolver.config != config.resolvers):
            self.resolver = Resolver(config.resolvers)  # reads resolv.conf: only when needed
        for key in [key for key in self.watches if key not in wanted]:
            watch = self.watches.pop(key)
            if watch.task is not None:
                watch.task.cancel()
                self.stopping.add(watch.task)
                watch.task.add_done_callback(self.stopping.discard)
            # Also for an upstream the reload removed: it might come back without this item.
            self.update(watch.upstream, watch.entry.source, ())
        for key, entry in wanted.items():
            assert self.resolver is not None
            if key not in self.watches:
                added = self.watches[key] = NameWatch(key[0], entry, self.resolver, self.update,
                                                      budgets[key[0]])
                added.start()
                continue
            watch = self.watches[key]
            watch.resolver = self.resolver
            if (watch.entry, watch.budget) != (entry, budgets[key[0]]):
                watch.entry, watch.budget = entry, budgets[key[0]]
                watch.publish()

    async def stop(self) -> None:
        watches = list(self.watches.values())
        self.watches.clear()
        await asyncio.gather(*(watch.stop() for watch in watches),
                             *self.stopping, return_exceptions=True)
