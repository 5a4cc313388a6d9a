"""The Redis cache: batch reads and writes of CRM entities, a JSON toolkit, and the breaker.

Every operation degrades instead of raising: with Redis off, down, slow or
failing, a read is a miss and a write is a no-op, within
`REDIS_TIMEOUT_SECONDS` at most, and the circuit breaker stops trying for a
while after repeated failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, Final, Literal, TypeVar, cast

import structlog
from redis.asyncio import Redis, RedisCluster
from redis.exceptions import NoPermissionError, NoScriptError, ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT

from app import jsonutil, metrics
from app.breaker import CircuitBreaker
from app.entities import Entity
from app.redis_client import (
    NODE_TIMEOUT_SHARE,
    NodeUnavailableError,
    RedisClient,
    WarmConnectionPool,
    lean_command,
)

R = TypeVar("R")
D = TypeVar("D")
T = TypeVar("T")

_CLEAR_BATCH = 500
_GLOB_SPECIAL = str.maketrans({c: f"\\{c}" for c in "*?[]\\"})

log = structlog.get_logger("app.cache")

# The batch operations of a page as Lua scripts: one command and one reply for a whole
# batch, where a pipeline costs redis-py a packed command and a parsed reply (each under
# its own timeout) per key, which was most of a cold page's CPU. Redis runs a script
# atomically, so a call holds at most _SCRIPT_KEYS keys. Not on a cluster: a script's keys
# must share one hash slot there, so a cluster keeps one pipeline per node.

# The leases of a cache space are one hash, a field per id (`<entity>:<id>`, valued
# `<token>:<deadline in ms, Redis's clock>`), not a key per id: Redis takes the leases of a
# page of 1,000 contacts (676 ids) in ~0.9 ms instead of ~3.8 ms for a `SET NX PX` per id
# (a key and an expiry each), and releases them in a fraction of it; where the hash does
# not exist yet (nobody holds a lease of the space), without reading a field. The hash
# lives as long as its newest lease (PEXPIRE); a field past its deadline is a lease given
# up. A new hash gets a field `~` whose value (longer than Redis's 64-byte
# `hash-max-listpack-value`) makes it a hash table from the start: Redis 7.0 inserts the
# fields of one HSET into a listpack one by one, ~3 ms for 676 (docs/performance.md).

# The lease and write scripts call with redis.pcall and answer the first error at the end,
# as the error itself: like a pipeline, one failing command (an invalid TTL, out of memory) does
# not stop the others (releasing the leases above all), and the error keeps its own code
# (READONLY stays READONLY on every Redis version, where a failed redis.call would be
# wrapped in a generic script error before Redis 7).

#: The `~` field of a lease hash: what the hash is, for whoever reads it.
LEASE_NOTE: Final = (
    "leases of the CRM fetches in flight: field <entity>:<id>, value <token>:<deadline ms>;"
    " this field only makes Redis store the hash as a table"
)

#: Fields of a lease hash sampled per lease call for leases past their deadline.
_LEASE_SWEEP: Final = 16

#: KEYS[1]: the space's lease hash; ARGV: token, PX, then the fields. A string with "1"
#: where the lease was taken (the field absent, or past its deadline).
_LEASE_LUA = """
local key, token, px = KEYS[1], ARGV[1], tonumber(ARGV[2])
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local value = token .. ':' .. (now + px)
local n = #ARGV - 2
local set, s, taken = {}, 0, nil
local fresh = redis.call('EXISTS', key) == 0
if fresh then
  -- No hash, no lease held: every field taken, none read (a cold page's usual case).
  set[1], set[2], s = '~', 'NOTE', 2
  for i = 3, n + 2 do
    set[s + 1], set[s + 2], s = ARGV[i], value, s + 2
  end
  taken = string.rep('1', n)
else
  local held = redis.pcall('HMGET', key, unpack(ARGV, 3))
  if held.err then return held end
  local flags = {}
  for i = 1, n do
    local h = held[i]
    if h and (tonumber(string.match(h, ':(%d+)$')) or 0) > now then
      flags[i] = '0'
    else
      flags[i] = '1'
      set[s + 1], set[s + 2], s = ARGV[i + 2], value, s + 2
    end
  end
  taken = table.concat(flags)
end
if s > 0 then
  local reply = redis.pcall('HSET', key, unpack(set, 1, s))
  if type(reply) == 'table' and reply.err then return reply end
  if redis.call('PTTL', key) < px then redis.call('PEXPIRE', key, px) end
end
-- Fields whose holder died are taken over only when their id is asked for again, and a
-- busy instance's hash never expires: a few sampled fields past their deadline go each
-- call on a hash that was there before (HRANDFIELD, Redis 6.2+; skipped where it fails).
if not fresh then
  local sample = redis.pcall('HRANDFIELD', key, SWEEP, 'WITHVALUES')
  if not sample.err then
    local dead = {}
    for i = 1, #sample, 2 do
      local deadline = tonumber(string.match(sample[i + 1], ':(%d+)$'))
      if deadline and deadline <= now then dead[#dead + 1] = sample[i] end
    end
    if #dead > 0 then redis.call('HDEL', key, unpack(dead)) end
  end
end
return taken
""".replace("NOTE", LEASE_NOTE).replace("SWEEP", str(_LEASE_SWEEP))

#: KEYS: n value keys, then the lease hash (when releasing); ARGV: n, token, value and EX
#: ("" for none) per key, then the lease fields to release. A lease is released only while
#: it still holds this caller's token; a hash left with only its `~` field is deleted.
_WRITE_LUA = """
local n, token, failed = tonumber(ARGV[1]), ARGV[2], nil
for i = 1, n do
  local ttl, reply = ARGV[2 * i + 2], nil
  if ttl == '' then
    reply = redis.pcall('SET', KEYS[i], ARGV[2 * i + 1])
  else
    reply = redis.pcall('SET', KEYS[i], ARGV[2 * i + 1], 'EX', ttl)
  end
  if type(reply) == 'table' and reply.err then
    failed = failed or reply
  end
end
local key, first = KEYS[n + 1], 2 * n + 3
if key and #ARGV >= first then
  local held = redis.pcall('HMGET', key, unpack(ARGV, first))
  if held.err then return failed or held end
  local mine, prefix = {}, token .. ':'
  for i = 1, #held do
    if held[i] and string.sub(held[i], 1, #prefix) == prefix then
      mine[#mine + 1] = ARGV[first + i - 1]
    end
  end
  if #mine > 0 then
    redis.pcall('HDEL', key, unpack(mine))
    if redis.call('HLEN', key) == 1 and redis.call('HEXISTS', key, '~') == 1 then
      redis.call('UNLINK', key)
    end
  end
end
return failed or 'OK'
"""

#: KEYS: n value keys, then the lease hash; ARGV: the lease field of each value key. A flat
#: array: value (nil when absent), PTTL and 1 where the lease is held (0: absent or past
#: its deadline) per key.
_READ_LEASED_LUA = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local n = #KEYS - 1
local held = redis.call('HMGET', KEYS[n + 1], unpack(ARGV))
local out = {}
for i = 1, n do
  out[3 * i - 2] = redis.call('GET', KEYS[i])
  out[3 * i - 1] = redis.call('PTTL', KEYS[i])
  local h = held[i]
  out[3 * i] = (h and (tonumber(string.match(h, ':(%d+)$')) or 0) > now) and 1 or 0
end
return out
"""

#: KEYS: the keys; a flat array of value (nil when absent) and PTTL per key.
_READ_TTL_LUA = """
local out = {}
for i = 1, #KEYS do
  out[2 * i - 1] = redis.call('GET', KEYS[i])
  out[2 * i] = redis.call('PTTL', KEYS[i])
end
return out
"""

#: Replies that mean "scripts cannot run here": disabled, denied by an ACL, or a proxy
#: in front of a sharded Redis that refuses a script over keys of several slots.
_NO_SCRIPTS = ("unknown command", "noperm", "no permissions", "crossslot")
#: Replies of a server without PEXPIRE's NX and GT (Redis 6; later ones name the option).
_NO_EXPIRY_OPTIONS = ("wrong number of arguments", "unsupported option", "syntax error")


def glob_escape(text: str) -> str:
    return text.translate(_GLOB_SPECIAL)


class RedisBudget:
    """The time one request may still spend waiting on Redis, across all its round trips:
    docs/limits.md bounds what Redis adds to a request to `REDIS_TIMEOUT_SECONDS` in total."""

    __slots__ = ("left", "spent")

    def __init__(self, seconds: float) -> None:
        self.left = seconds
        self.spent = 0.0

    def charge(self, seconds: float) -> None:
        self.left -= seconds
        self.spent += seconds


class Cache:
    """Typed async access to Redis with JSON values, shared by the whole process.

    `client=None` (`USE_REDIS=false`) makes every call a miss or a no-op
    without ever connecting.
    """

    def __init__(
        self,
        client: RedisClient | None,
        *,
        timeout: float,
        prefix: str = "",
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self._client = client
        self._timeout = timeout
        self.prefix = prefix
        self.breaker = breaker or CircuitBreaker(threshold=3, cooldown=5.0)
        self._scripts: _Scripts | None = None
        # Whether PEXPIRE takes NX and GT (Redis 7+), for the lease calls without scripts:
        # False once refused, so that a server before Redis 7 is asked once, not every call.
        self._expiry_options = True
        # A request's call is not started with less of its budget left than this: it could
        # hardly finish, and cutting it short costs a connection (on a cluster, it must
        # outlast the per-node deadline, which lets a slow node fail alone).
        self._min_call = timeout * (
            NODE_TIMEOUT_SHARE if isinstance(client, RedisCluster) else _MIN_CALL_SHARE
        )
        # The error code (OOM, NOPERM, ...) each failing operation last answered: a command
        # error is logged when an operation starts failing or fails differently, and when it
        # recovers, not once per request (a full Redis refuses every write).
        self._failing: dict[str, str] = {}
        self._background: set[asyncio.Task[None]] = set()
        if client is not None:
            metrics.REDIS_UP.set(1)
            if not isinstance(client, RedisCluster):
                self._scripts = _Scripts()

    @property
    def enabled(self) -> bool:
        return self._client is not None

    def affords(self, budget: RedisBudget | None) -> bool:
        """Whether a request with `budget` left may still start a call: not with less than
        a fifth of `REDIS_TIMEOUT_SECONDS` (on a cluster, the per-node share) left."""
        return budget is None or budget.left >= self._min_call

    def budget(self) -> RedisBudget:
        """A new request's Redis budget: `REDIS_TIMEOUT_SECONDS` for all its calls together."""
        return RedisBudget(self._timeout)

    async def health(self) -> Literal["up", "down", "disabled"]:
        """A PING through the breaker: "down" at once while the circuit is open."""
        if self._client is None:
            return "disabled"
        return "up" if await self.ping() else "down"

    def entity_key(self, entity: Entity, instance: str, entity_id: str) -> str:
        return f"{self.prefix}{entity}:{instance}:{entity_id}"

    def lease_key(self, space: str) -> str:
        """The hash of a cache space's leases: the short-lived locks replicas take while
        they fetch ids from the CRM, a field per id (`lease_fields`)."""
        return f"{self.prefix}lease:{space}"

    @staticmethod
    def lease_fields(pairs: Iterable[tuple[Entity, str]]) -> list[str]:
        """The field of each (entity, id) in its space's lease hash."""
        return [f"{entity}:{entity_id}" for entity, entity_id in pairs]

    def entity_match(self, entity: Entity, instance: str, entity_id: str | None = None) -> str:
        """The SCAN glob of every cached `entity` of `instance` (in every credential's
        space), and of nothing else; with `entity_id`, of that id in the credentials' spaces."""
        match = f"{glob_escape(self.prefix)}{entity}:{glob_escape(instance)}:*"
        return match if entity_id is None else f"{match}:{glob_escape(entity_id)}"

    # -- the enrichment's batch operations (raw compact JSON bytes) -------------------------

    async def read_raw(
        self, keys: Sequence[str], budget: RedisBudget | None = None
    ) -> list[bytes | None] | None:
        """Every value in one round trip (one per node on a cluster); None when unavailable."""
        if not keys:
            return []
        values: list[bytes | None] | None = await self._run(
            "mget", lambda c: _mget(c, keys), None, budget=budget, keys=len(keys)
        )
        return values

    async def read_with_ttl(
        self, keys: Sequence[str], budget: RedisBudget | None = None
    ) -> list[tuple[bytes | None, int]] | None:
        """Each value with its remaining TTL in ms (-1: none, -2: absent), in one round trip.

        One script call; on a cluster, where the keys of a script must share a
        slot, a pipeline of GET and PTTL per key, which the client splits per node.
        """
        if not keys:
            return []

        async def scripted(
            client: RedisClient, scripts: _Scripts
        ) -> list[tuple[bytes | None, int]]:
            flat = await _in_chunks(scripts.read_ttl, client, keys)
            return [(flat[n], int(flat[n + 1])) for n in range(0, len(flat), 2)]

        async def pipelined(client: RedisClient) -> list[tuple[bytes | None, int]]:
            pipe = client.pipeline(transaction=False)
            _queue_get_pttl(pipe, keys)
            return _with_ttl(await pipe.execute())

        entries: list[tuple[bytes | None, int]] | None = await self._run(
            "get_pttl", self._scripted(scripted, pipelined), None, budget=budget, keys=len(keys)
        )
        return entries

    async def take_leases(
        self,
        key: str,
        fields: Sequence[str],
        token: str,
        ttl_ms: int,
        budget: RedisBudget | None = None,
    ) -> list[bool] | None:
        """Lease each field of the hash `key` that nobody holds (absent, or past its deadline)
        for `ttl_ms`, in one round trip: which ones this caller got.

        Without scripts (a cluster, scripts denied): `HSETNX` per field with the deadline
        of this process's clock, then, in a second round trip only when needed, the
        fields refused but past their deadline taken over (and, when PEXPIRE's NX and GT
        failed, the hash's TTL set: a server before Redis 7 refuses them once, then every
        call sends a plain PEXPIRE in its one round trip).
        A `ttl_ms` under 1 counts as 1 (`PEXPIRE 0` would delete the hash, every lease in it).
        """
        if not fields:
            return []
        ttl_ms = max(1, ttl_ms)

        async def scripted(client: RedisClient, scripts: _Scripts) -> list[bool]:
            calls: list[_Call] = [([key], [token, ttl_ms, *part]) for part in _parts(fields)]
            replies = await scripts.lease.each(client, calls)
            return [flag == 49 for reply in replies for flag in reply]  # b"1"

        async def pipelined(client: RedisClient) -> list[bool]:
            now = int(time.time() * 1000)
            value = f"{token}:{now + ttl_ms}".encode()
            options = self._expiry_options
            pipe = client.pipeline(transaction=False)
            for field in fields:
                pipe.hsetnx(key, field, value)
            # The hash lives as long as its newest lease: a new hash gets the TTL (NX), a
            # shorter one is lengthened (GT), never shortened. Before Redis 7, a plain
            # PEXPIRE: it may shorten the lease of a replica with a longer lease TTL
            # (UPSTREAM_TIMEOUT_SECONDS); with one setting everywhere, the newest lease's
            # deadline is the latest anyway.
            if options:
                pipe.pexpire(key, ttl_ms, nx=True)
                pipe.pexpire(key, ttl_ms, gt=True)
            else:
                pipe.pexpire(key, ttl_ms)
            for part in _parts(fields):
                pipe.hmget(key, part)
            replies = await pipe.execute(raise_on_error=False)
            n = len(fields)
            # A lease whose node is down cannot be coordinated: fetch the id as if taken.
            taken = [isinstance(reply, Exception) or bool(reply) for reply in replies[:n]]
            expiry_failed = options and isinstance(replies[n], Exception)
            if expiry_failed and _expiry_options_refused(replies[n]):
                self._expiry_options = False  # NX and GT are Redis 7+: asked once, not again
            found = _joined(replies[n + (2 if options else 1) :])
            # A field past its deadline was given up by its holder: taken over, without a
            # script's atomicity (two replicas may both take it, and both fetch the id).
            dead = (
                []
                if found is None
                else [
                    field
                    for field, ok, held in zip(fields, taken, found, strict=True)
                    if not ok and not _lease_live(held, now)
                ]
            )
            if not dead and not (expiry_failed and any(taken)):
                return taken
            pipe = client.pipeline(transaction=False)
            for part in _parts(dead):
                pipe.hset(key, mapping=dict.fromkeys(part, value))
            for part in _parts(dead):
                pipe.hmget(key, part)
            if not self._expiry_options:  # before Redis 7 (see above)
                pipe.pexpire(key, ttl_ms)
            else:  # (NX: the hash may have expired, and been made again, in between)
                pipe.pexpire(key, ttl_ms, nx=True)
                pipe.pexpire(key, ttl_ms, gt=True)
            replies = await pipe.execute(raise_on_error=False)
            chunks = len(_parts(dead))
            now_held = _joined(replies[chunks : 2 * chunks])
            if now_held is not None:
                won = {field for field, held in zip(dead, now_held, strict=True) if held == value}
                taken = [ok or field in won for field, ok in zip(fields, taken, strict=True)]
            return taken

        taken: list[bool] | None = await self._run(
            "lease", self._scripted(scripted, pipelined), None, budget=budget, keys=len(fields)
        )
        return taken

    async def read_leased(
        self,
        keys: Sequence[str],
        lease_key: str,
        fields: Sequence[str],
        budget: RedisBudget | None = None,
    ) -> list[tuple[bytes | None, int, bool]] | None:
        """Each value with its TTL in ms (as `read_with_ttl`) and whether its lease, the
        field of the same position in the hash `lease_key`, is held, in one round trip."""
        if not keys:
            return []

        async def scripted(
            client: RedisClient, scripts: _Scripts
        ) -> list[tuple[bytes | None, int, bool]]:
            calls: list[_Call] = [
                ([*part, lease_key], part_fields)
                for part, part_fields in zip(_parts(keys), _parts(fields), strict=True)
            ]
            parts = await scripts.read_leased.each(client, calls)
            flat = [reply for part in parts for reply in part]
            return [(flat[i], int(flat[i + 1]), flat[i + 2] == 1) for i in range(0, len(flat), 3)]

        async def pipelined(client: RedisClient) -> list[tuple[bytes | None, int, bool]]:
            pipe = client.pipeline(transaction=False)
            _queue_get_pttl(pipe, keys)
            for part in _parts(fields):
                pipe.hmget(lease_key, part)
            replies = await pipe.execute(raise_on_error=False)
            held = _joined(replies[2 * len(keys) :])  # (a node that is down: nobody seen)
            now = int(time.time() * 1000)
            return [
                (raw, pttl, held is not None and _lease_live(held[i], now))
                for i, (raw, pttl) in enumerate(_with_ttl(replies[: 2 * len(keys)]))
            ]

        entries: list[tuple[bytes | None, int, bool]] | None = await self._run(
            "get_pttl", self._scripted(scripted, pipelined), None, budget=budget, keys=len(keys)
        )
        return entries

    async def write_raw(
        self,
        items: Sequence[tuple[str, bytes, int | None]],
        release: Sequence[str] = (),
        token: str = "",
        lease_key: str = "",
    ) -> bool:
        """`SET key value EX ttl` for each item (no EX where ttl is None), in one round trip.

        `release`, fields of the lease hash `lease_key` (leases taken with `token`), are
        deleted after every value, only where they still hold `token` (so releasing a lease
        the caller may not hold is harmless): in the same script call with scripts; on a
        cluster or where scripts are denied, read in the same round trip and deleted in a
        second, not atomically. Not a transaction: MULTI (or MSET + EXPIRE)
        breaks on a cluster. One item that Redis refuses does not stop the others; the
        call then answers False.
        """
        if not release:
            lease_key = ""
        if not items and not lease_key:
            return True

        def call(values: Sequence[tuple[str, bytes, int | None]], fields: Sequence[str]) -> _Call:
            args: list[EncodableT] = [len(values), token]
            for _, value, ttl in values:
                args += (value, "" if ttl is None else ttl)
            keys = [key for key, _, _ in values]
            if fields:
                keys.append(lease_key)
                args += fields
            return keys, args

        async def scripted(client: RedisClient, scripts: _Scripts) -> bool:
            if len(items) <= _SCRIPT_KEYS and len(release) <= _SCRIPT_KEYS:
                await scripts.write(client, *call(items, release))
                return True
            # A large batch: every value first, then the leases, so that a replica
            # waiting on a lease never sees neither the lease nor the value.
            try:
                await scripts.write.many(client, [call(part, ()) for part in _parts(items)])
            finally:  # the leases are released whatever happened to the values
                await scripts.write.many(client, [call((), part) for part in _parts(release)])
            return True

        async def pipelined(client: RedisClient) -> bool:
            pipe = client.pipeline(transaction=False)
            for key, value, ttl in items:
                pipe.set(key, value, ex=ttl)
            for part in _parts(release) if lease_key else []:
                pipe.hmget(lease_key, part)
            replies = await pipe.execute(raise_on_error=False)
            if lease_key:
                # Only the fields that still hold this token (another replica may have
                # taken one over past its deadline): read, then deleted, not atomically.
                held = _joined(replies[len(items) :])
                mine = (
                    []
                    if held is None
                    else [f for f, v in zip(release, held, strict=True) if _holds(v, token)]
                )
                if mine:
                    pipe = client.pipeline(transaction=False)
                    for part in _parts(mine):
                        pipe.hdel(lease_key, *part)
                    await pipe.execute()
            failed = next((r for r in replies[: len(items)] if isinstance(r, Exception)), None)
            if failed is not None:
                raise failed
            return True

        # In the background, where nobody waits: a very large batch gets time to match.
        chunks = -(-(len(items) + len(release)) // _BACKGROUND_KEYS_PER_TIMEOUT)
        written: bool = await self._run(
            "write",
            self._scripted(scripted, pipelined),
            False,
            deadline=self._timeout * max(1, chunks),
            keys=len(items) + len(release),
        )
        return written

    # -- the toolkit the original service exposed ------------------------------------------

    async def get(self, key: str) -> Any:
        raw: bytes | str | None = await self._run("get", lambda c: c.get(self.prefix + key), None)
        return _decode(raw)

    async def set(self, key: str, value: Any, ttl: int | None = None) -> bool:
        data = jsonutil.dumps(value)
        result = await self._run("set", lambda c: c.set(self.prefix + key, data, ex=ttl), None)
        return bool(result)

    async def delete(self, key: str) -> int:
        return int(await self._run("delete", lambda c: c.delete(self.prefix + key), 0))

    async def exists(self, key: str) -> bool:
        return bool(await self._run("exists", lambda c: c.exists(self.prefix + key), 0))

    async def mget(self, keys: Sequence[str]) -> list[Any]:
        raws = await self.read_raw([self.prefix + key for key in keys])
        if raws is None:
            return [None] * len(keys)
        return [_decode(raw) for raw in raws]

    async def mset(self, items: Iterable[tuple[str, Any, int | None]]) -> bool:
        """Store each (key, value, ttl) in one round trip; a ttl of None keeps the key forever.

        False when Redis refused any item (an invalid TTL) or is unavailable."""
        return await self.write_raw(
            [(self.prefix + key, jsonutil.dumps(value), ttl) for key, value, ttl in items]
        )

    async def mdel(self, keys: Sequence[str]) -> int:
        """UNLINK `keys` in one pipeline (split per node on a cluster); how many existed."""
        return await self.unlink_keys([self.prefix + key for key in keys]) or 0

    async def expire(self, key: str, ttl: int) -> bool:
        return bool(await self._run("expire", lambda c: c.expire(self.prefix + key, ttl), False))

    async def clear(self, pattern: str) -> int:
        """Delete every key matching the glob `pattern` (under the prefix) with SCAN + UNLINK."""
        return await self.clear_matching(glob_escape(self.prefix) + pattern) or 0

    async def unlink_keys(self, keys: Sequence[str]) -> int | None:
        """UNLINK full keys; how many existed, or None when Redis is unavailable."""
        if not keys:
            return 0
        unlinked: int | None = await self._run("unlink", lambda c: _unlink(c, list(keys)), None)
        return unlinked

    async def clear_matching(self, match: str) -> int | None:
        """SCAN + UNLINK in bounded batches for a full-key glob; None when Redis is unavailable."""

        async def scan_and_unlink(client: RedisClient) -> int:
            deleted = 0
            batch: list[bytes | str] = []
            async for key in self._scan(client, match, _CLEAR_BATCH):
                batch.append(key)
                if len(batch) >= _CLEAR_BATCH:
                    async with asyncio.timeout(self._timeout):
                        deleted += await _unlink(client, batch)
                    batch = []
            if batch:
                async with asyncio.timeout(self._timeout):
                    deleted += await _unlink(client, batch)
            return deleted

        cleared: int | None = await self._run("clear", scan_and_unlink, None, deadline=None)
        return cleared

    async def count_matching(self, match: str) -> int | None:
        """How many keys match a full-key glob (SCAN); None when Redis is unavailable."""

        async def scan_count(client: RedisClient) -> int:
            return sum([1 async for _ in self._scan(client, match, 1000)])

        counted: int | None = await self._run("scan", scan_count, None, deadline=None)
        return counted

    async def _scan(
        self, client: RedisClient, match: str, count: int
    ) -> AsyncIterator[bytes | str]:
        """SCAN, each step within `REDIS_TIMEOUT_SECONDS` (a whole scan may take longer):
        standalone connections have no socket timeout of their own (app.redis_client)."""
        if isinstance(client, RedisCluster):  # per node, under its socket timeout
            async for key in client.scan_iter(match=match, count=count):
                yield key
            return
        cursor = 0
        while True:
            async with asyncio.timeout(self._timeout):
                cursor, keys = await client.scan(cursor, match=match, count=count)
            for key in keys:
                yield key
            if not cursor:
                return

    async def ping(self) -> bool:
        return bool(await self._run("ping", lambda c: c.ping(), False))

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    def _scripted(
        self,
        scripted: Callable[[RedisClient, _Scripts], Awaitable[R]],
        pipelined: Callable[[RedisClient], Awaitable[R]],
    ) -> Callable[[RedisClient], Awaitable[R]]:
        """The script where Redis runs them, else the pipeline (a cluster, scripts denied)."""

        async def call(client: RedisClient) -> R:
            scripts = self._scripts
            if scripts is None:
                return await pipelined(client)
            try:
                return await scripted(client, scripts)
            except ResponseError as exc:
                if isinstance(exc, ReadOnlyError) or not _scripts_unavailable(exc):
                    raise
                log.warning("redis.scripts_unavailable", error=str(exc))
                self._scripts = None
                return await pipelined(client)

        return call

    # -- the one guard every call goes through ---------------------------------------------

    async def _run(
        self,
        op: str,
        call: Callable[[RedisClient], Awaitable[R]],
        default: D,
        *,
        deadline: float | Literal["default"] | None = "default",
        budget: RedisBudget | None = None,
        keys: int = 1,
    ) -> R | D:
        """`call` under the breaker and a deadline: the call's own, or what is left of the
        request's `budget` (too little left: no round trip, a miss). Only a timeout with the full
        `REDIS_TIMEOUT_SECONDS` on a call of at most `_SCRIPT_KEYS` keys counts against the
        breaker: the rest of a spent budget, or a very large page, proves no outage."""
        client = self._client
        if client is None or not self.affords(budget):
            return default
        if not self.breaker.allow():
            return default
        metrics.child(metrics.REDIS_ROUND_TRIPS, op).inc()
        limit = self._timeout if deadline == "default" else deadline
        if budget is not None and limit is not None:
            limit = min(limit, budget.left)
        decisive = (limit is None or limit >= self._timeout) and keys <= _SCRIPT_KEYS
        started = time.perf_counter()
        try:
            async with asyncio.timeout(limit):
                result = await call(client)
        except asyncio.CancelledError:
            self.breaker.abandon()
            raise
        except ResponseError as exc:
            metrics.REDIS_ERRORS.inc()
            if isinstance(exc, ReadOnlyError):
                self.breaker.failure(exc)
            else:
                self.breaker.success()
                self._command_failed(op, exc)
            return default
        except Exception as exc:  # an outage: connection refused, timeout, reset, full pool
            metrics.REDIS_ERRORS.inc()
            timed_out = isinstance(exc, TimeoutError | RedisTimeoutError)
            if isinstance(exc, NodeUnavailableError) or (
                timed_out and (not decisive or self._connecting(client))
            ):
                # A cluster node already known down (skipped at no cost), the rest of a spent
                # budget, a very large page, or the wait for a connection being opened (a
                # distant Redis coming back): none of them says Redis as a whole is out.
                self.breaker.abandon()
            else:
                self.breaker.failure(exc)
                self._drop_idle_connections(client)
            return default
        finally:
            if budget is not None:
                budget.charge(time.perf_counter() - started)
        self.breaker.success()
        if self._failing and op in self._failing:
            del self._failing[op]
            log.warning("redis.command_recovered", op=op)
        return result

    def _command_failed(self, op: str, exc: ResponseError) -> None:
        # redis-py maps known codes (OOM, NOPERM, READONLY...) to classes and strips them
        code = type(exc).__name__ if type(exc) is not ResponseError else str(exc).split(" ")[0]
        if self._failing.get(op) != code:
            self._failing[op] = code
            log.warning("redis.command_error", op=op, error=str(exc))

    @staticmethod
    def _connecting(client: RedisClient) -> bool:
        pool = getattr(client, "connection_pool", None)
        return isinstance(pool, WarmConnectionPool) and pool.connecting

    def _drop_idle_connections(self, client: RedisClient) -> None:
        """After an outage, idle pooled connections may point at a dead server (a restarted
        Redis, a failed-over primary): close them, so the breaker's next probe dials anew
        instead of failing once per stale connection. In the background: closing a TLS
        connection to a hung server waits for its reply, which is no request's time.
        Cluster clients manage their nodes."""
        pool = getattr(client, "connection_pool", None)
        if pool is None:
            return

        async def drop() -> None:
            with contextlib.suppress(Exception):
                await pool.disconnect(inuse_connections=False)
            if isinstance(pool, WarmConnectionPool):
                pool.warm_up()  # the next request finds them open

        task = asyncio.create_task(drop())
        self._background.add(task)
        task.add_done_callback(self._background.discard)


#: The least share of `REDIS_TIMEOUT_SECONDS` a request's call is started with.
_MIN_CALL_SHARE = 0.2

#: At most this many keys per script call: Redis runs a script alone, so a very large
#: page is split into calls of about a millisecond each, sent at once (one round trip).
_SCRIPT_KEYS = 1000

#: A background write gets `REDIS_TIMEOUT_SECONDS` per this many keys.
_BACKGROUND_KEYS_PER_TIMEOUT = 10_000

#: One script call: its keys and its other arguments.
_Call = tuple[Sequence[str], Sequence[EncodableT]]


async def _in_chunks(
    script: _Script, client: RedisClient, keys: Sequence[str], args: Sequence[EncodableT] = ()
) -> list[Any]:
    """`script` over slices of at most `_SCRIPT_KEYS` keys (same `args` each), in one
    pipeline; the replies joined in order."""
    parts = await script.each(client, [(part, args) for part in _parts(keys)])
    return [reply for part in parts for reply in part]


class _Script:
    """EVALSHA, and EVAL (which also caches it) where Redis lacks the script: after a
    restart, a failover or SCRIPT FLUSH, one extra round trip instead of redis-py's two."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()

    async def __call__(
        self, client: RedisClient, keys: Sequence[str], args: Sequence[EncodableT] = ()
    ) -> Any:
        # Scripts run on standalone and Sentinel clients only, which `lean_command` serves.
        redis = cast(Redis, client)
        try:
            return await lean_command(redis, "EVALSHA", self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await lean_command(redis, "EVAL", self.source, len(keys), *keys, *args)

    async def each(self, client: RedisClient, calls: Sequence[_Call]) -> list[Any]:
        """The reply of each call: one call as a command of its own, more in one pipeline."""
        if len(calls) == 1:
            return [await self(client, *calls[0])]
        return await self.many(client, calls)

    async def many(self, client: RedisClient, calls: Sequence[_Call]) -> list[Any]:
        """Several calls in one pipeline: one connection and one round trip, however many
        (Redis runs each script alone, and serves others between them). Raises the first
        error, after every call has run."""
        pipe = client.pipeline(transaction=False)
        for keys, args in calls:
            pipe.evalsha(self.sha, len(keys), *keys, *args)
        replies = list(await pipe.execute(raise_on_error=False))
        missing = [n for n, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:  # (only the calls that did not run: a lease script is not idempotent)
            pipe = client.pipeline(transaction=False)
            for n in missing:
                keys, args = calls[n]
                pipe.eval(self.source, len(keys), *keys, *args)
            for n, reply in zip(missing, await pipe.execute(raise_on_error=False), strict=True):
                replies[n] = reply
        failed = next((reply for reply in replies if isinstance(reply, Exception)), None)
        if failed is not None:
            raise failed
        return replies


class _Scripts:
    """The Lua scripts of the batch operations."""

    lease = _Script(_LEASE_LUA)
    write = _Script(_WRITE_LUA)
    read_ttl = _Script(_READ_TTL_LUA)
    read_leased = _Script(_READ_LEASED_LUA)


def _parts(items: Sequence[T]) -> list[Sequence[T]]:
    """`items` in slices of at most `_SCRIPT_KEYS`: no command carries more."""
    return [items[i : i + _SCRIPT_KEYS] for i in range(0, len(items), _SCRIPT_KEYS)]


def _queue_get_pttl(pipe: Any, keys: Sequence[str]) -> None:
    """A GET and a PTTL per key, queued on `pipe` (their replies: `_with_ttl`)."""
    for key in keys:
        pipe.get(key)
        pipe.pttl(key)


def _with_ttl(replies: Sequence[Any]) -> list[tuple[bytes | None, int]]:
    """The replies of `_queue_get_pttl`: (value, PTTL in ms) per key. On a cluster, a node
    that is down leaves its exception as its replies: a miss, (None, -2)."""
    return [
        (None, -2)
        if isinstance(replies[n], Exception) or isinstance(replies[n + 1], Exception)
        else (replies[n], int(replies[n + 1]))
        for n in range(0, len(replies), 2)
    ]


def _joined(replies: Sequence[Any]) -> list[Any] | None:
    """The replies of a command sent in slices (`_parts`), joined; None if one failed."""
    if any(isinstance(reply, Exception) for reply in replies):
        return None
    return [value for reply in replies for value in reply]


def _holds(value: bytes | None, token: str) -> bool:
    """Whether a lease field's value (`<token>:<deadline ms>`) is `token`'s."""
    return value is not None and value.startswith(f"{token}:".encode())


def _lease_live(value: bytes | None, now_ms: int) -> bool:
    """Whether a lease field's value (`<token>:<deadline ms>`) holds at `now_ms`."""
    if value is None:
        return False
    _, _, deadline = value.rpartition(b":")
    return deadline.isdigit() and int(deadline) > now_ms


def _expiry_options_refused(exc: BaseException) -> bool:
    """Whether a `PEXPIRE ... NX` failed because the server has no such option (before Redis
    7: "wrong number of arguments"), not for a passing reason (READONLY during a failover)."""
    message = str(exc).lower()
    return isinstance(exc, ResponseError) and any(
        marker in message for marker in _NO_EXPIRY_OPTIONS
    )


def _scripts_unavailable(exc: ResponseError) -> bool:
    if isinstance(exc, NoPermissionError):
        return True
    message = str(exc).lower()
    return any(marker in message for marker in _NO_SCRIPTS)


async def _mget(client: RedisClient, keys: Sequence[str]) -> list[bytes | None]:
    """MGET, split per slot on a cluster, and at most `_SCRIPT_KEYS` keys an MGET: a very
    large page is read in one pipeline of MGETs, none of which holds Redis for long."""
    if isinstance(client, RedisCluster):
        return list(await client.mget_nonatomic(keys))
    if len(keys) <= _SCRIPT_KEYS:
        return cast(list[bytes | None], await lean_command(client, "MGET", *keys))
    pipe = client.pipeline(transaction=False)
    for part in _parts(keys):
        pipe.mget(part)
    return [value for part in await pipe.execute() for value in part]


async def _unlink(client: RedisClient, keys: Sequence[bytes | str]) -> int:
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.unlink(key)
    replies = await pipe.execute()
    # On a cluster, the keys of a node that is down are still there: not done, say so.
    failed = next((reply for reply in replies if isinstance(reply, Exception)), None)
    if failed is not None:
        raise failed
    return sum(int(n) for n in replies)


def _decode(raw: bytes | str | None) -> Any:
    if raw is None:
        return None
    try:
        return jsonutil.loads(raw.encode() if isinstance(raw, str) else raw)
    except ValueError:
        return None
