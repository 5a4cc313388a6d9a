"""Builds the Redis client for `REDIS_MODE`: standalone, cluster or sentinel.

Every mode gets the same failure behaviour: `REDIS_TIMEOUT_SECONDS` for
connecting and for each command, and no retries (redis-py's default retries
with backoff would turn a dead Redis into seconds per request; the cache's
circuit breaker decides when to try again instead).

A cluster is not all up or all down: one master can be gone while the others
serve their slots. `ClusterClient` keeps that distinction, so the cache misses
only the keys of the unavailable master and keeps hitting the rest, and it
heals by itself once a replica has taken over (see the class). Its nodes get a
share of `REDIS_TIMEOUT_SECONDS`, so that one slow node fails alone, within the
cache's deadline for the whole batch.

Sentinel mode needs nothing of the kind: the whole dataset is on one primary,
and redis-py's sentinel connections follow it (see `build_sentinel_master`).

In standalone and sentinel modes a request never pays for connecting: opening a
connection (TCP, TLS, HELLO, AUTH, CLIENT SETINFO) costs several round trips,
which with a Redis 70 ms away would exceed a request's whole Redis budget every
time. `WarmConnectionPool` opens connections in the background instead (a few at
start-up, more as load asks for them) and hands requests only open ones.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, cast
from urllib.parse import urlsplit

import structlog
from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode, ClusterPipeline
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.commands.helpers import list_or_args
from redis.connection import HiredisRespSerializer, parse_url
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ConnectionError,
    MaxConnectionsError,
    RedisClusterException,
    SlotNotCoveredError,
    TimeoutError,
    TryAgainError,
)
from redis.typing import EncodableT, KeysT, KeyT
from redis.utils import HIREDIS_AVAILABLE

from app import metrics
from app.config import Settings

RedisClient: TypeAlias = "Redis | RedisCluster"

log = structlog.get_logger("app.redis")

#: In cluster mode each node gets this share of `REDIS_TIMEOUT_SECONDS`, so that a hung
#: node fails on its own (and only its keys miss) before the cache's overall deadline
#: gives up on the whole batch.
NODE_TIMEOUT_SHARE = 0.6
#: At most one topology refresh (CLUSTER SLOTS) this often while a node is failing.
TOPOLOGY_REFRESH_INTERVAL = 0.5
TOPOLOGY_REFRESH_DEADLINE = 3.0

#: Errors that say "this node (or its slot) cannot answer now", not "this command is wrong".
UNAVAILABLE = (
    ConnectionError,
    TimeoutError,
    ClusterDownError,
    SlotNotCoveredError,
    TryAgainError,
    AskError,  # also MovedError: a redirection that could not be followed
)

_Command = tuple[tuple[Any, ...], dict[str, Any]]


@dataclass(slots=True)
class _Down:
    """A node that failed at `since`; skipped until `retry_at`, when one call probes it."""

    since: float
    retry_at: float


class NodeUnavailableError(ConnectionError):
    """The node serving this key failed recently; it is not tried again until its cooldown ends."""


def _use_hiredis_packer() -> None:
    """Pack commands with hiredis (C), as redis-py's sync client already does.

    redis-py's asyncio connections always pack in Python: for the MGET of a page's
    ~180 keys that is ~3.5x the CPU of hiredis (bench/README.md). Same bytes out.
    """
    if not HIREDIS_AVAILABLE:
        return
    import hiredis

    pack: Callable[..., list[bytes]] = HiredisRespSerializer().pack
    pack_args: Callable[..., bytes] = hiredis.pack_command

    def pack_command(self: AbstractConnection, *args: EncodableT) -> list[bytes]:
        # Straight to hiredis: redis-py's serializer first walks every argument in Python
        # (a third of the CPU of a page's MGET). It still takes what hiredis would not:
        # a command name of two words ("CONFIG RESETSTAT"), bytearray or memoryview.
        name = args[0]
        if isinstance(name, str) and " " not in name:
            try:
                return [pack_args(args)]
            except TypeError:
                pass
        return pack(*args)

    AbstractConnection.pack_command = pack_command  # type: ignore[method-assign]


_use_hiredis_packer()


def _no_retry() -> Retry:
    return Retry(NoBackoff(), 0)


#: Connections a pool opens at start-up, before any request asks.
WARM_CONNECTIONS = 4
#: While connects fail, one is retried this often in the background.
_REDIAL_SECONDS = 1.0


def connect_timeout(settings: Settings) -> float:
    """How long a background connect may take: a handshake is several round trips, paid
    by no request, so a distant Redis is still reached."""
    return max(2.0, 8 * settings.redis_timeout_seconds)


def _stale(connection: AbstractConnection) -> bool | None:
    """Whether an idle connection must not be used: closed, or data waiting on it, which
    means the server closed it (a restart) or a reply was left unread. Read from its
    stream's state, which the event loop keeps current while the connection is idle; None
    when this redis-py keeps it elsewhere (then `can_read` must tell, one loop turn)."""
    if not connection.is_connected:
        return True
    reader = getattr(connection, "_reader", None)
    buffered = getattr(reader, "_buffer", None)
    if not isinstance(reader, asyncio.StreamReader) or buffered is None:
        return None
    return bool(buffered) or reader.at_eof() or reader.exception() is not None


async def lean_command(client: Redis, *args: EncodableT) -> Any:
    """One command on a pooled connection of a standalone or Sentinel client, without
    redis-py's per-call layers (retries, off here anyway; observability hooks; response
    callbacks, which MGET and EVALSHA do not have): half the CPU of a page's MGET. The
    same errors: an error reply raises its `ResponseError`; a broken or cancelled call
    closes its connection. The caller bounds it (`asyncio.timeout`): connections of these
    clients have no socket timeout of their own (`build_redis`)."""
    pool = client.connection_pool
    connection = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        await connection.send_packed_command(connection.pack_command(*args), check_health=False)
        return await connection.read_response()
    finally:
        await pool.release(connection)


class WarmConnectionPool(BlockingConnectionPool):
    """A bounded pool that never connects on a caller's time.

    A caller gets an open connection that is idle, or waits (within its own
    deadline) for one to be released or for one opened in the background on its
    behalf; when that connect fails, every waiter fails at once with its error,
    so a Redis that refuses connections costs no waiting. Idle connections found
    closed are dropped, not reopened inline.
    """

    def __init__(
        self, *, connect_timeout: float, warm: int = WARM_CONNECTIONS, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self._connect_timeout = connect_timeout
        self._warm = warm
        self._dialing = 0
        self._dials: set[asyncio.Task[None]] = set()
        self._dial_failures = 0
        self._dial_error: BaseException | None = None
        self._redial: asyncio.TimerHandle | None = None
        self._waiting = 0  # callers in `_wait_for_connection`

    async def get_connection(
        self, command_name: Any = None, *keys: Any, **options: Any
    ) -> AbstractConnection:
        # The common case, an idle open connection and nobody waiting for one: taken at
        # once, without the condition's lock or a read of the socket (a loop turn each).
        if not self._waiting:
            connection = self._take_idle()
            if connection is not None:
                return connection
        self._waiting += 1
        try:
            return await self._wait_for_connection()
        finally:
            self._waiting -= 1

    def _take_idle(self) -> AbstractConnection | None:
        idle = self._available_connections
        while idle:
            connection = idle.pop()
            stale = _stale(connection)
            if stale is None:  # cannot tell without a read: the waiting path checks it
                idle.append(connection)
                return None
            if not stale:
                self._in_use_connections.add(connection)
                return connection
            self._close_soon(connection)
            self.warm_up()
        return None

    async def _wait_for_connection(self) -> AbstractConnection:
        while True:
            async with self._condition:
                ready = functools.partial(self._ready, self._dial_failures)
                if not ready() and self._total() < self.max_connections:
                    self._dial()
                try:
                    async with asyncio.timeout(self.timeout):
                        await self._condition.wait_for(ready)
                except asyncio.CancelledError:
                    # (also the caller's deadline) A `notify` may have woken this waiter
                    # just before: pass it on, or an idle connection would wait unused.
                    if self._has_idle():
                        self._condition.notify()
                    raise
                if not self._available_connections:
                    raise ConnectionError(f"connecting to Redis failed: {self._dial_error!r}")
                connection = self._available_connections.pop()
                self._in_use_connections.add(connection)
            stale = _stale(connection)
            if stale is None:
                try:
                    stale = await connection.can_read()
                except (ConnectionError, OSError):
                    stale = True
                except BaseException:
                    self._put_back(connection)
                    raise
            if not stale:
                return connection
            # Dropped at once, with no await in between: a cancellation here cannot leave
            # it counted as in use forever.
            self._in_use_connections.discard(connection)
            self._close_soon(connection)
            self.warm_up()

    def warm_up(self) -> None:
        """Open connections in the background until `warm` are open or opening (call inside
        the event loop). Not while connects fail: one retry is then scheduled instead, every
        `_REDIAL_SECONDS`, so that a connection is open again when Redis is back (and the
        breaker's probe finds it) without hammering a Redis that is down."""
        if self._dial_error is None:
            for _ in range(min(self._warm, self.max_connections) - self._total()):
                self._dial()
        elif self._redial is None:
            self._redial = asyncio.get_running_loop().call_later(_REDIAL_SECONDS, self._retry)

    @property
    def connecting(self) -> bool:
        """No connection is open, and one is being opened: a caller that timed out now was
        waiting for a connect, which says nothing yet about whether Redis is up."""
        return self._dialing > 0 and not self._in_use_connections and not self._has_idle()

    def _retry(self) -> None:
        self._redial = None
        if self._dial_error is not None and self._total() < self.max_connections:
            self._dial()

    async def release(self, connection: AbstractConnection) -> None:
        if not self._waiting and connection.is_connected and not connection.should_reconnect():  # type: ignore[no-untyped-call]
            # Nobody to wake: straight back to the idle list (redis-py's release takes two
            # locks and awaits its observability hooks, a fifth of a warm page's MGET).
            self._in_use_connections.remove(connection)
            self._available_connections.append(connection)
            return
        await super().release(connection)
        if not connection.is_connected:
            # Closed by an error or a cancelled command: open a replacement in the
            # background, so the next requests still find `warm` connections open.
            self.warm_up()

    def _put_back(self, connection: AbstractConnection) -> None:
        self._in_use_connections.discard(connection)
        self._available_connections.append(connection)

    def _close_soon(self, connection: AbstractConnection) -> None:
        task = asyncio.create_task(connection.disconnect(nowait=True))
        self._dials.add(task)
        task.add_done_callback(self._dials.discard)

    def _ready(self, failures: int) -> bool:
        """An open connection is idle, or a connect failed since `failures` was read."""
        return self._has_idle() or self._dial_failures != failures

    def _has_idle(self) -> bool:
        idle = self._available_connections
        idle[:] = [c for c in idle if c.is_connected]
        return bool(idle)

    def _total(self) -> int:
        open_idle = sum(1 for c in self._available_connections if c.is_connected)
        return len(self._in_use_connections) + open_idle + self._dialing

    def _dial(self) -> None:
        self._dialing += 1
        task = asyncio.create_task(self._open())
        self._dials.add(task)
        task.add_done_callback(self._dials.discard)

    async def _open(self) -> None:
        connection: AbstractConnection = self.make_connection()  # type: ignore[no-untyped-call]
        try:
            async with asyncio.timeout(self._connect_timeout):
                await connection.connect()  # type: ignore[no-untyped-call]
        except Exception as exc:
            self._dialing -= 1
            self._dial_failures += 1
            self._dial_error = exc
            self._close_soon(connection)
            async with self._condition:
                self._condition.notify_all()
            log.debug("redis.connect_failed", error=f"{type(exc).__name__}: {exc}")
            self.warm_up()  # schedules the retry
            return
        except BaseException:
            self._dialing -= 1
            self._close_soon(connection)
            raise
        self._dialing -= 1
        recovered = self._dial_error is not None
        self._dial_error = None
        self._available_connections.append(connection)
        async with self._condition:
            self._condition.notify_all()
        if recovered:
            self.warm_up()

    async def disconnect(self, inuse_connections: bool = True) -> None:
        await super().disconnect(inuse_connections)
        if inuse_connections:  # closing the pool: stop opening new ones too
            if self._redial is not None:
                self._redial.cancel()
                self._redial = None
            for task in list(self._dials):
                task.cancel()
            await asyncio.gather(*self._dials, return_exceptions=True)


def build_redis(settings: Settings) -> RedisClient:
    """A client for `settings`; it connects in the background (`warm_up`), or on first use."""
    timeouts: dict[str, Any] = {
        # No socket timeout: every call is bounded by the caller (app.cache, the request's
        # budget), and redis-py would wrap each send in a task of its own to enforce it.
        "socket_timeout": None,
        "socket_connect_timeout": connect_timeout(settings),
        "retry": _no_retry(),
        "health_check_interval": 0,
    }
    if settings.redis_mode == "cluster":
        return build_cluster(settings)
    if settings.redis_mode == "sentinel":
        return build_sentinel_master(settings, timeouts)
    pool = WarmConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_max_connections,
        timeout=connect_timeout(settings),
        connect_timeout=connect_timeout(settings),
        **timeouts,
    )
    return Redis.from_pool(pool)  # closing the client closes the pool, and its connects


def warm_up(client: RedisClient) -> None:
    """Start opening the pool's first connections, so the first requests find them open."""
    pool = getattr(client, "connection_pool", None)
    if isinstance(pool, WarmConnectionPool):
        pool.warm_up()


def build_cluster(settings: Settings) -> ClusterClient:
    """A `ClusterClient` that discovers the cluster from the node in `REDIS_URL`."""
    node_timeout = settings.redis_timeout_seconds * NODE_TIMEOUT_SHARE
    client = ClusterClient.from_url(
        settings.redis_url,
        node_cooldown=settings.redis_breaker_cooldown_seconds,
        node_timeout=node_timeout,
        max_connections=settings.redis_max_connections,  # per node
        socket_timeout=node_timeout,
        socket_connect_timeout=node_timeout,
        health_check_interval=0,
        # One attempt per call: redis-py's cluster retries close every connection and
        # sleep 0.25 s between attempts; `ClusterClient` refreshes the topology instead.
        retry=_no_retry(),
        # Serve the slots that are covered when some are not (a master down, no replica yet).
        require_full_coverage=False,
        # A MOVED reply patches the slot map (a failover moves a whole range at once);
        # never the full re-initialisation, which disconnects commands in flight.
        reinitialize_steps=0,
    )
    return cast(ClusterClient, client)


def build_sentinel_master(settings: Settings, timeouts: dict[str, Any]) -> Redis:
    """The master of `REDIS_SENTINEL_MASTER`, as the sentinels of `REDIS_SENTINELS` name it.

    Credentials, database and TLS come from `REDIS_URL` (its host and port are not
    used). redis-py's sentinel connections ask the sentinels for the master on
    every (re)connect, and turn a READONLY reply (a demoted master) into a
    disconnect, so after a failover the next connections reach the new master.
    """
    url: dict[str, Any] = parse_url(settings.redis_url)  # type: ignore[no-untyped-call]
    master_options = {k: v for k, v in url.items() if k in ("username", "password", "db")}
    if urlsplit(settings.redis_url).scheme == "rediss":
        master_options["ssl"] = True
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        settings.sentinel_hosts,
        sentinel_kwargs={
            "socket_timeout": settings.redis_timeout_seconds,
            "socket_connect_timeout": settings.redis_timeout_seconds,
            "retry": _no_retry(),
        },
        **timeouts,
    )
    master: SentinelMaster = sentinel.master_for(
        settings.redis_sentinel_master,
        redis_class=SentinelMaster,
        connection_pool_class=WarmSentinelConnectionPool,
        max_connections=settings.redis_max_connections,
        timeout=connect_timeout(settings),
        connect_timeout=connect_timeout(settings),
        **master_options,
        **timeouts,
    )
    master.sentinels = sentinel
    return master


class WarmSentinelConnectionPool(SentinelConnectionPool, WarmConnectionPool):
    """Sentinel-managed connections (each connect asks the sentinels for the master),
    bounded and opened in the background like the standalone pool's."""


class SentinelMaster(Redis):
    """The primary's client; closing it also closes the connections to the sentinels."""

    sentinels: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.sentinels is not None:
            await self.sentinels.aclose()


class ClusterClient(RedisCluster):
    """A `RedisCluster` whose non-transactional pipelines degrade node by node.

    redis-py runs a cluster pipeline as one pipeline per node, in parallel, but one
    unreachable node fails the whole call, and (with retries off) nothing ever
    refreshes the slot map, so the client would keep calling the dead master after
    its replica took over. Here:

    * each node's part of a pipeline succeeds or fails on its own: the commands of
      an unavailable node hold their exception in the results (as with
      `raise_on_error=False`), the others hold their replies; the call raises only
      when no node answered at all, so the cache's breaker sees a whole outage;
    * a node that failed is skipped (its commands fail at once, costing no latency)
      for `node_cooldown` seconds, then one call probes it again;
    * while a node is failing, the slot map is refreshed from the live nodes in the
      background (CLUSTER SLOTS, at most every `TOPOLOGY_REFRESH_INTERVAL`), so the
      keys of a failed master go to its promoted replica as soon as the cluster has
      promoted it.

    `mget_nonatomic` (one MGET per slot, one round trip per node) reads through the
    same path: the values of an unavailable node's keys are None, misses.
    """

    def __init__(
        self,
        *args: Any,
        node_cooldown: float = 5.0,
        node_timeout: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.node_cooldown = node_cooldown
        self.node_timeout = node_timeout
        self._down: dict[str, _Down] = {}  # by node name
        self._refresh_task: asyncio.Task[None] | None = None
        self._refreshed_at = -math.inf

    def pipeline(
        self, transaction: Any | None = None, shard_hint: Any | None = None
    ) -> ClusterPipeline:
        if transaction or shard_hint:
            return super().pipeline(transaction, shard_hint)
        return NodeIsolatedPipeline(self)  # type: ignore[abstract]

    async def mget_nonatomic(self, keys: KeysT, *args: KeyT) -> list[Any]:  # type: ignore[override]
        """Values of `keys` in their order; None for absent keys and for unavailable nodes."""
        all_keys: list[KeyT] = list_or_args(keys, args)
        by_slot: dict[int, list[int]] = {}
        for position, key in enumerate(all_keys):
            by_slot.setdefault(self.keyslot(key), []).append(position)
        commands: list[_Command] = [
            (("MGET", *(all_keys[p] for p in positions)), {}) for positions in by_slot.values()
        ]
        replies = await self.execute_isolated(commands, raise_on_error=False)
        values: list[Any] = [None] * len(all_keys)
        for positions, reply in zip(by_slot.values(), replies, strict=True):
            if isinstance(reply, Exception):
                if not isinstance(reply, UNAVAILABLE):
                    raise reply
                continue
            for position, value in zip(positions, reply, strict=True):
                values[position] = value
        return values

    async def ping(self, **kwargs: Any) -> bool:
        """PING every master (known-down ones count as failed at no cost): whether all
        answered. Raises only when none did."""
        await self.initialize()
        commands: list[_Command] = [
            (("PING",), {"target_nodes": [node]}) for node in self.get_primaries()
        ]
        replies = await self.execute_isolated(commands, raise_on_error=False)
        return not any(isinstance(reply, Exception) for reply in replies)

    async def execute_isolated(
        self,
        commands: Sequence[_Command],
        *,
        raise_on_error: bool = True,
        allow_redirections: bool = True,
    ) -> list[Any]:
        """Run `commands` as one pipeline per node, in parallel, each node failing alone.

        Results are in the order of `commands`; an unavailable node's commands hold
        their exception. Raises when no node answered, or (`raise_on_error`) for the
        first error that is the command's own fault (a wrong type, a syntax error).
        """
        if not commands:
            return []
        await self.initialize()
        results: list[Any] = [None] * len(commands)
        groups: dict[str, tuple[ClusterNode, list[int]]] = {}
        for position, (args, options) in enumerate(commands):
            try:
                node = await self._node_for(args, options)
            except RedisClusterException as exc:  # a slot nobody serves, a keyless command
                results[position] = exc
                if isinstance(exc, SlotNotCoveredError):
                    self._request_refresh()
                continue
            groups.setdefault(node.name, (node, []))[1].append(position)
        answered = await self._run_on_nodes(groups, commands, results, allow_redirections)
        if not answered:
            raise next(r for r in results if isinstance(r, Exception))
        if raise_on_error:
            for result in results:
                if isinstance(result, Exception) and not isinstance(result, UNAVAILABLE):
                    raise result
        return results

    async def _run_on_nodes(
        self,
        groups: dict[str, tuple[ClusterNode, list[int]]],
        commands: Sequence[_Command],
        results: list[Any],
        allow_redirections: bool,
    ) -> bool:
        """One pipeline per node in parallel, all within `node_timeout`; whether any answered.

        The deadline is this call's own, not each socket read's: a node that has not
        answered by then fails alone, and the others' replies are kept, before the
        caller's overall deadline would discard them all.
        """
        if not groups:
            return False
        tasks = {
            asyncio.create_task(
                self._run_on_node(node, positions, commands, results, allow_redirections)
            ): (node, positions)
            for node, positions in groups.values()
        }
        try:
            _, late = await asyncio.wait(tasks, timeout=self.node_timeout)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        except asyncio.CancelledError:
            for task in tasks:
                task.cancel()
            raise
        answered = False
        for task, (node, positions) in tasks.items():
            if task in late:
                error = TimeoutError(f"{node.name} did not answer within {self.node_timeout}s")
                self._fail(positions, results, error)
                self._node_failed(node, error)
            elif task.result():
                answered = True
        return answered

    async def aclose(self) -> None:
        task, self._refresh_task = self._refresh_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await super().aclose()

    async def _node_for(self, args: tuple[Any, ...], options: dict[str, Any]) -> ClusterNode:
        targets = options.pop("target_nodes", None)
        if targets is not None:
            nodes = self._parse_target_nodes(targets)
            if len(nodes) != 1:
                raise RedisClusterException(f"a pipelined command needs one node: {args[0]}")
            return nodes[0]
        slot = await self._determine_slot(*args)
        return self.nodes_manager.get_node_from_slot(slot)

    async def _run_on_node(
        self,
        node: ClusterNode,
        positions: list[int],
        commands: Sequence[_Command],
        results: list[Any],
        allow_redirections: bool,
    ) -> bool:
        """Fill `results` at `positions` from one pipeline on `node`; whether it answered."""
        started = time.monotonic()
        down = self._down.get(node.name)
        if down is not None:
            if started < down.retry_at:
                self._fail(positions, results, NodeUnavailableError(f"{node.name} is down"))
                self._request_refresh(node.name)
                return False
            down.retry_at = started + self.node_cooldown  # this call is the probe
        pipe = super().pipeline()
        for position in positions:
            args, options = commands[position]
            pipe.execute_command(*args, target_nodes=[node], **options)
        try:
            replies = await pipe.execute(
                raise_on_error=False, allow_redirections=allow_redirections
            )
        except MaxConnectionsError as exc:  # this process is saturated; the node is fine
            self._fail(positions, results, exc)
            return False
        except UNAVAILABLE as exc:
            self._fail(positions, results, exc)
            self._node_failed(node, exc)
            return False
        for position, reply in zip(positions, replies, strict=True):
            results[position] = reply
        cluster_down = next((r for r in replies if isinstance(r, ClusterDownError)), None)
        if cluster_down is not None:
            self._node_failed(node, cluster_down)
            return False
        self._node_answered(node, started)
        return True

    @staticmethod
    def _fail(positions: list[int], results: list[Any], error: Exception) -> None:
        for position in positions:
            results[position] = error

    def _node_failed(self, node: ClusterNode, error: Exception) -> None:
        if self.nodes_manager.get_node(node_name=node.name) is None:
            return  # a call sent before the node left the slot map: old news
        metrics.REDIS_ERRORS.inc()
        now = time.monotonic()
        if node.name not in self._down:
            log.warning(
                "redis.cluster_node_down",
                node=node.name,
                cooldown_seconds=self.node_cooldown,
                error=f"{type(error).__name__}: {error}",
            )
        self._down[node.name] = _Down(since=now, retry_at=now + self.node_cooldown)
        self._request_refresh(node.name)

    def _node_answered(self, node: ClusterNode, started: float) -> None:
        down = self._down.get(node.name)
        # a call sent before the node last failed proves nothing about it now
        if down is not None and started >= down.since:
            del self._down[node.name]
            log.warning("redis.cluster_node_up", node=node.name)

    def _request_refresh(self, failed_node: str | None = None) -> None:
        """Refresh the slot map in the background, unless one ran or runs right now."""
        if self._refresh_task is not None and not self._refresh_task.done():
            return
        now = time.monotonic()
        if now - self._refreshed_at < TOPOLOGY_REFRESH_INTERVAL:
            return
        self._refreshed_at = now
        self._refresh_task = asyncio.create_task(self._refresh_topology(failed_node))

    async def _refresh_topology(self, failed_node: str | None) -> None:
        try:
            async with asyncio.timeout(TOPOLOGY_REFRESH_DEADLINE):
                await self.nodes_manager.initialize(last_failed_node_name=failed_node)
        except Exception as exc:  # the next failure asks again
            log.debug("redis.cluster_refresh_failed", error=f"{type(exc).__name__}: {exc}")
            return
        serving = {node.name for node in self.get_primaries()}
        for name in [name for name in self._down if name not in serving]:
            del self._down[name]
            log.warning("redis.cluster_node_replaced", node=name)


class NodeIsolatedPipeline(ClusterPipeline):
    """The non-transactional pipeline of a `ClusterClient`: see `ClusterClient.execute_isolated`."""

    def __init__(self, client: ClusterClient) -> None:
        super().__init__(client, transaction=False)
        self._isolated_client = client
        self._commands: list[_Command] = []

    def execute_command(self, *args: KeyT | EncodableT, **kwargs: Any) -> NodeIsolatedPipeline:
        self._commands.append((args, kwargs))
        return self

    # redis-py's cluster pipeline makes `unlink` a coroutine that queues nothing unless
    # awaited; here it queues like every other command.
    def unlink(self, *names: KeyT) -> NodeIsolatedPipeline:  # type: ignore[override]
        for name in names:
            self.execute_command("UNLINK", name)
        return self

    def mset_nonatomic(  # type: ignore[override]
        self, mapping: Mapping[Any, EncodableT]
    ) -> NodeIsolatedPipeline:
        for key, value in mapping.items():
            self.execute_command("SET", key, value)
        return self

    def __len__(self) -> int:
        return len(self._commands)

    async def execute(
        self, raise_on_error: bool = True, allow_redirections: bool = True
    ) -> list[Any]:
        commands, self._commands = self._commands, []
        return await self._isolated_client.execute_isolated(
            commands, raise_on_error=raise_on_error, allow_redirections=allow_redirections
        )

    async def reset(self) -> None:  # type: ignore[override]
        self._commands = []
