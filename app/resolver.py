"""Cache-aside resolution of CRM entities: one Redis read, the misses from the CRM, once.

Steps 4 to 6 of the request path (docs/design.md): read every key of a page in one round trip, fetch
only the misses from the CRM in batches run in parallel, and store what came
back (never a failure) with a pipelined `SET ... EX`.

Misses are fetched by a task of their own, not by the request that found
them: concurrent requests missing the same id await the same future (single
flight), and a client that disconnects cancels only its own wait, never a
CRM call or a Redis write that other requests depend on.

Across replicas, the task first takes a short lease per id in Redis (a field
of the instance's lease hash, one script call; `app.cache`): ids leased by
another replica are awaited in Redis for a moment instead of fetched again,
like memcache leases.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, cast

import structlog

from app import jsonutil, metrics
from app.admission import Slot
from app.cache import Cache, RedisBudget
from app.entities import ENTITIES, Entity
from app.upstream import CrmError, Upstream

log = structlog.get_logger("app.resolver")

NEGATIVE: Final = b"null"
#: Instances whose hit/miss counts (GET /cache/{instance}/stats) a process keeps: the least
#: recently served are forgotten first, so a flood of instance names cannot grow memory.
MAX_COUNTED_INSTANCES: Final = 10_000
#: Values read from Redis whose validity is remembered (by hash: ~50 bytes each).
_MAX_CHECKED: Final = 200_000
#: A page with more ids than this lets other requests run every so many ids.
_YIELD_EVERY: Final = 5_000
#: Loop turns from setting a future to its shielded waiter running again (app.contacts).
_TURNS_TO_WAKE: Final = 3
_POLL_FIRST: Final = 0.005
_POLL_MAX: Final = 0.05


def instance_of(space: str) -> str:
    """The instance of a cache space (an instance name never contains ":")."""
    return space.partition(":")[0]


class _Failed:
    """The result of an id whose CRM batch failed: `null` for this request, and never cached."""


FAILED: Final = _Failed()

_Key = tuple[Entity, str, str]
_Result = bytes | None | _Failed
_Stored = tuple[_Key, bytes, int]


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """How long entries live and the optional behaviours around expiry (all in seconds)."""

    ttl: int = 300
    negative_ttl: int = 60
    stale: int = 0
    refresh_ahead: int = 0
    lease_wait: float = 0.0
    lease_ttl: float = 10.0
    max_value_bytes: int = 1024 * 1024

    @property
    def reads_ttls(self) -> bool:
        return self.stale > 0 or self.refresh_ahead > 0


@dataclass(slots=True)
class Resolution:
    """What a page's ids resolved to: raw JSON of each object, None where there is none."""

    values: dict[Entity, dict[str, bytes | None]]
    complete: bool = True
    stale: int = 0
    hits: int = 0
    misses: int = 0
    crm_calls: int = 0
    refreshes: int = 0
    crm_wait: float = 0.0
    redis_wait: float = 0.0
    redis_ok: bool = True


class EntityResolver:
    """Resolves customer and user ids of one instance through Redis, then the CRM."""

    def __init__(
        self,
        cache: Cache,
        upstream: Upstream,
        *,
        batch_size: int,
        policy: CachePolicy,
        max_counted_instances: int = MAX_COUNTED_INSTANCES,
        scope_key: bytes | None = None,
    ) -> None:
        """`scope_key`: None when the CRM is read with the service's own token, else the key
        of the hash that scopes entries to the caller's credential (see `space`)."""
        self._cache = cache
        self._scope_key = scope_key
        self._upstream = upstream
        self._batch_size = batch_size
        self._policy = policy
        self._inflight: dict[_Key, asyncio.Future[_Result]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._counts: dict[str, list[int]] = {}  # in least recently served order
        self._checked: set[int] = set()  # hashes of values read from Redis and found valid
        self._warned_invalid = False
        self._max_counted = max_counted_instances

    async def resolve(
        self,
        instance: str,
        wanted: dict[Entity, Sequence[str]],
        authorization: str | None,
        request_id: str,
        *,
        slot: Slot | None = None,
    ) -> Resolution:
        """Resolve unique, valid ids of each entity; never raises for Redis or CRM failures.

        `slot`, the request's turn (app.admission), is given back while it waits for the CRM.
        """
        policy = self._policy
        space = self.space(instance, authorization)
        keys: list[str] = []
        for entity in ENTITIES:
            head = self._cache.entity_key(entity, space, "")
            keys += [head + entity_id for entity_id in wanted[entity]]
        budget = self._cache.budget()
        if policy.reads_ttls:
            entries = await self._cache.read_with_ttl(keys, budget)
            redis_ok = entries is not None
        else:
            raws = await self._cache.read_raw(keys, budget)
            if raws is not None and None not in raws and self._checked.issuperset(map(hash, raws)):
                return self._all_hits(instance, wanted, raws, budget)
            redis_ok = raws is not None
            entries = (
                None
                if raws is None or raws.count(None) == len(raws)
                else list(zip(raws, itertools.repeat(-1)))
            )
        resolution = Resolution(values={e: {} for e in ENTITIES}, redis_ok=redis_ok)
        if entries is None:
            # A cold page (nothing found) or a failed read: every id a miss, no per-id loop.
            misses = {entity: list(wanted[entity]) for entity in ENTITIES}
            refresh: dict[Entity, list[str]] = {}
            stale: dict[_Key, bytes] = {}
            for entity, ids in misses.items():
                if ids:
                    metrics.child(metrics.CACHE_MISSES, entity).inc(len(ids))
                resolution.misses += len(ids)
        else:
            misses, refresh, stale = await self._sort(space, wanted, entries, resolution)
        self._count(instance, resolution.hits, resolution.misses)
        if any(refresh.values()):
            resolution.refreshes = self._refresh(space, refresh, authorization, request_id)
        if resolution.misses:
            await self._fetch_misses(
                space, misses, stale, authorization, request_id, resolution, slot, budget
            )
        resolution.redis_wait = budget.spent
        return resolution

    async def _sort(
        self,
        space: str,
        wanted: dict[Entity, Sequence[str]],
        entries: list[tuple[bytes | None, int]],
        resolution: Resolution,
    ) -> tuple[dict[Entity, list[str]], dict[Entity, list[str]], dict[_Key, bytes]]:
        """Each id's entry a hit (its value into `resolution`), a miss, or due for a refresh:
        the misses, the refreshes, and the stale values that may stand in for failed misses."""
        policy = self._policy
        misses: dict[Entity, list[str]] = {e: [] for e in ENTITIES}
        refresh: dict[Entity, list[str]] = {e: [] for e in ENTITIES}
        stale: dict[_Key, bytes] = {}
        stale_ms = policy.stale * 1000
        refresh_ms = policy.refresh_ahead * 1000
        position = 0
        huge = len(entries) > _YIELD_EVERY
        for entity in ENTITIES:
            values = resolution.values[entity]
            hits = 0
            for entity_id in wanted[entity]:
                raw, pttl = entries[position]
                position += 1
                if huge and not position % _YIELD_EVERY:
                    await asyncio.sleep(0)  # a very large page lets other requests run
                if raw is None or (hash(raw) not in self._checked and not self._check(raw)):
                    misses[entity].append(entity_id)
                elif stale_ms and 0 <= pttl <= stale_ms:
                    # past its TTL, kept only to stand in if the CRM fails now
                    misses[entity].append(entity_id)
                    stale[(entity, space, entity_id)] = raw
                else:
                    values[entity_id] = None if raw == NEGATIVE else raw
                    hits += 1
                    if refresh_ms and 0 <= pttl - stale_ms <= refresh_ms:
                        refresh[entity].append(entity_id)
            if hits:
                metrics.child(metrics.CACHE_HITS, entity).inc(hits)
            if misses[entity]:
                metrics.child(metrics.CACHE_MISSES, entity).inc(len(misses[entity]))
            resolution.hits += hits
            resolution.misses += len(misses[entity])
        return misses, refresh, stale

    def _all_hits(
        self,
        instance: str,
        wanted: dict[Entity, Sequence[str]],
        raws: list[bytes | None],
        budget: RedisBudget,
    ) -> Resolution:
        """The warm page, every value found and known valid: `resolve` without its per-id
        loop, each step one C call over the page (a fifth of a warm request's Python)."""
        values: dict[Entity, dict[str, bytes | None]] = {}
        start = 0
        for entity in ENTITIES:
            ids = wanted[entity]
            found: dict[str, bytes | None] = dict(
                zip(ids, raws[start : start + len(ids)], strict=True)
            )
            start += len(ids)
            if NEGATIVE in found.values():
                for entity_id in [i for i, raw in found.items() if raw == NEGATIVE]:
                    found[entity_id] = None
            values[entity] = found
            if ids:
                metrics.child(metrics.CACHE_HITS, entity).inc(len(ids))
        self._count(instance, len(raws), 0)
        return Resolution(values=values, hits=len(raws), redis_wait=budget.spent)

    def space(self, instance: str, authorization: str | None) -> str:
        """Where the instance's entries live for this caller: the instance itself when the
        CRM is read with the service's own token (one object serves every caller), else
        the instance and a keyed hash of the caller's credential, so that no caller is ever
        served what the CRM answered another (docs/api.md, "Credentials and the shared cache").
        The hash reveals nothing of the credential and is the same on every replica."""
        if self._scope_key is None:
            return instance
        credential = (authorization or "").encode("utf-8", "surrogatepass")
        digest = hmac.new(self._scope_key, credential, hashlib.sha256).hexdigest()
        return f"{instance}:{digest[:32]}"

    async def invalidate(self, entity: Entity, instance: str, entity_id: str) -> int | None:
        """Drop one id of an instance from the cache, in every credential's space, and any
        lookup of it in flight (fetched before the change, it must not be stored); how many
        entries were deleted, or None when Redis is unavailable."""
        for key in [k for k in self._inflight if k[0] == entity and k[2] == entity_id]:
            if instance_of(key[1]) == instance:
                del self._inflight[key]
        shared_key = self._cache.entity_key(entity, instance, entity_id)
        deleted = await self._cache.unlink_keys([shared_key])
        if deleted is None or self._scope_key is None:
            return deleted
        scoped = await self._cache.clear_matching(
            self._cache.entity_match(entity, instance, entity_id)
        )
        return None if scoped is None else deleted + scoped

    def forget_instance(self, instance: str) -> None:
        """Drop every in-flight lookup of one instance, in every credential's space."""
        for key in [key for key in self._inflight if instance_of(key[1]) == instance]:
            del self._inflight[key]

    def _check(self, raw: bytes) -> bool:
        """Whether a value read from Redis is strict JSON (another writer, or a bug, may
        have stored anything): what is not is a miss, fetched again and overwritten. Each
        distinct value is parsed once; a warm page then costs one hash lookup per id."""
        try:
            jsonutil.loads(raw)
        except (ValueError, RecursionError):
            if not self._warned_invalid:
                self._warned_invalid = True
                log.warning("cache.invalid_value", sample=repr(raw[:80]))
            return False
        if len(self._checked) >= _MAX_CHECKED:
            self._checked.clear()
        self._checked.add(hash(raw))
        return True

    def _count(self, instance: str, hits: int, misses: int) -> None:
        counts = self._counts.pop(instance, None) or [0, 0]
        counts[0] += hits
        counts[1] += misses
        self._counts[instance] = counts  # now the most recently served
        if len(self._counts) > self._max_counted:
            del self._counts[next(iter(self._counts))]

    def counts(self, instance: str) -> tuple[int, int]:
        """Hits and misses of `instance` in this process since it started."""
        hits, misses = self._counts.get(instance, (0, 0))
        return hits, misses

    async def drain(self, seconds: float) -> None:
        """Let background fetches and writes finish (at shutdown), for at most `seconds`."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=seconds)

    # -- reading ---------------------------------------------------------------------------

    # -- fetching --------------------------------------------------------------------------

    def _claim(
        self, space: str, ids: dict[Entity, list[str]]
    ) -> tuple[dict[Entity, list[str]], dict[_Key, asyncio.Future[_Result]]]:
        """Register a future for each id nobody in this process is fetching yet."""
        create_future = asyncio.get_running_loop().create_future
        inflight = self._inflight
        owned: dict[Entity, list[str]] = {}
        mine: dict[_Key, asyncio.Future[_Result]] = {}
        # One comprehension per step (a cold page claims hundreds of ids); an id given twice
        # is claimed once.
        for entity in ENTITIES:
            keys = list(dict.fromkeys([(entity, space, entity_id) for entity_id in ids[entity]]))
            if inflight:
                keys = [key for key in keys if key not in inflight]
            mine.update(zip(keys, [create_future() for _ in keys], strict=True))
            owned[entity] = [key[2] for key in keys]
        inflight.update(mine)
        return owned, mine

    def _start(
        self,
        space: str,
        owned: dict[Entity, list[str]],
        futures: dict[_Key, asyncio.Future[_Result]],
        authorization: str | None,
        request_id: str,
        *,
        leases: bool = True,
        budget: RedisBudget | None = None,
    ) -> None:
        """Fetch and store in a task of its own; `budget`: the Redis budget of the request
        that waits for it (None for background refreshes, which nobody waits for)."""
        task = asyncio.create_task(
            self._fetch_and_store(
                space, owned, futures, authorization, request_id, leases=leases, budget=budget
            )
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _refresh(
        self,
        space: str,
        ids: dict[Entity, list[str]],
        authorization: str | None,
        request_id: str,
    ) -> int:
        """Fetch entries close to expiry in the background, once per id in this process."""
        owned, mine = self._claim(space, ids)
        if mine:
            for entity in ENTITIES:
                if owned[entity]:
                    metrics.CACHE_REFRESHES.labels(entity=entity).inc(len(owned[entity]))
            self._start(space, owned, mine, authorization, request_id)
        return len(mine)

    async def _fetch_misses(
        self,
        space: str,
        misses: dict[Entity, list[str]],
        stale: dict[_Key, bytes],
        authorization: str | None,
        request_id: str,
        resolution: Resolution,
        slot: Slot | None,
        budget: RedisBudget,
    ) -> None:
        owned, mine = self._claim(space, misses)
        if mine:
            resolution.crm_calls = sum(-(-len(ids) // self._batch_size) for ids in owned.values())
            # After a failed read, a lease round trip would only add a second timeout.
            self._start(
                space,
                owned,
                mine,
                authorization,
                request_id,
                leases=resolution.redis_ok,
                budget=budget,
            )
        inflight = self._inflight
        waits = {
            entity: [inflight.get((entity, space, entity_id)) for entity_id in misses[entity]]
            for entity in ENTITIES
        }
        pending = [f for fs in waits.values() for f in fs if f is not None and not f.done()]
        if pending:
            started = time.perf_counter()
            redis_before = budget.spent
            if slot is not None:
                slot.pause()  # waiting on I/O: other requests may use the loop meanwhile
            # One suspension per batch, not a callback per id (as asyncio.wait would add).
            # shield: a cancelled request leaves the shared futures, and the task that
            # fills them, running for everyone else.
            for waiting in pending:
                if not waiting.done():
                    await asyncio.shield(waiting)
            # The leases (and lease polls) taken for this request are Redis time, not CRM time.
            waited = time.perf_counter() - started
            resolution.crm_wait = max(0.0, waited - (budget.spent - redis_before))
            if slot is not None:
                await slot.resume()
        for entity, futures in waits.items():
            ids = misses[entity]
            # None: an admin invalidation dropped the lookup in between; treat as failed
            results = [FAILED if future is None else future.result() for future in futures]
            values = resolution.values[entity]
            # (a FAILED result is replaced just below)
            values.update(zip(ids, cast(list[bytes | None], results), strict=True))
            if FAILED not in results:
                continue
            for entity_id, result in zip(ids, results, strict=True):
                if result is not FAILED:
                    continue
                fallback = stale.get((entity, space, entity_id))
                if fallback is not None:
                    values[entity_id] = None if fallback == NEGATIVE else fallback
                    resolution.stale += 1
                    metrics.CACHE_STALE.labels(entity=entity).inc()
                else:
                    resolution.complete = False
                    values[entity_id] = None

    async def _fetch_and_store(
        self,
        space: str,
        owned: dict[Entity, list[str]],
        futures: dict[_Key, asyncio.Future[_Result]],
        authorization: str | None,
        request_id: str,
        *,
        leases: bool,
        budget: RedisBudget | None,
    ) -> None:
        policy = self._policy
        fetching = owned  # what this process fetches, by entity
        contested: list[tuple[Entity, str]] = []
        held: list[str] = []
        token = uuid.uuid4().hex
        # No lease call that the request's budget no longer affords: it would be skipped,
        # and its leases then released by token although none was taken.
        lease_key = self._cache.lease_key(space)
        if leases and policy.lease_wait > 0 and self._cache.enabled and self._cache.affords(budget):
            pairs = [(entity, entity_id) for entity in ENTITIES for entity_id in owned[entity]]
            fields = self._cache.lease_fields(pairs)
            ttl_ms = int(policy.lease_ttl * 1000)
            taken = await self._cache.take_leases(lease_key, fields, token, ttl_ms, budget)
            if taken is not None and all(taken):  # (the usual case)
                held = fields
            elif taken is not None:
                contested = [pair for pair, ok in zip(pairs, taken, strict=True) if not ok]
                fetching = _by_entity(pair for pair, ok in zip(pairs, taken, strict=True) if ok)
                held = [field for field, ok in zip(fields, taken, strict=True) if ok]
            else:
                # The call failed, yet part of it may have run (one of several script calls,
                # or pipelined HSETNXs): release every lease it may have taken, by token.
                held = fields

        async def fetch(entity: Entity, ids: list[str], to_store: list[_Stored]) -> None:
            try:
                found = await self._upstream.entities(
                    entity, instance_of(space), ids, authorization, request_id
                )
            except Exception as exc:  # CrmError, or a bug: the batch failed either way
                log.warning(
                    "crm.batch_failed",
                    entity=entity,
                    instance=instance_of(space),
                    ids=len(ids),
                    error=str(exc) if isinstance(exc, CrmError) else repr(exc)[:200],
                    request_id=request_id,
                )
                for entity_id in ids:
                    futures[(entity, space, entity_id)].set_result(FAILED)
                return
            metrics.child(metrics.CRM_IDS_FETCHED, entity).inc(len(ids))
            for entity_id in ids:
                raw = found.get(entity_id)
                key = (entity, space, entity_id)
                futures[key].set_result(raw)
                if raw is None:
                    if policy.negative_ttl > 0:
                        to_store.append((key, NEGATIVE, policy.negative_ttl + policy.stale))
                elif len(raw) <= policy.max_value_bytes:
                    to_store.append((key, raw, policy.ttl + policy.stale))
                else:  # served, never stored: one huge value would hold Redis for everyone
                    metrics.child(metrics.CACHE_TOO_LARGE, entity).inc()

        async def fetch_and_store(by_entity: dict[Entity, list[str]], release: list[str]) -> None:
            to_store: list[_Stored] = []
            try:
                await asyncio.gather(
                    *(
                        fetch(entity, ids[start : start + self._batch_size], to_store)
                        for entity, ids in by_entity.items()
                        for start in range(0, len(ids), self._batch_size)
                    )
                )
            finally:
                # Whatever happened, what came back is stored and the leases released:
                # a lease left behind would make every replica wait CACHE_LEASE_WAIT_SECONDS.
                # An id invalidated while its lookup was in flight was dropped from
                # `_inflight`: what was fetched may predate the change, so it is not stored.
                # First the requests woken by these results answer (their wake-up takes
                # two loop turns): encoding the write is ~1 ms a page they need not wait.
                for _ in range(_TURNS_TO_WAKE):
                    await asyncio.sleep(0)
                await self._cache.write_raw(
                    [
                        (self._cache.entity_key(*key), raw, ttl)
                        for key, raw, ttl in to_store
                        if self._inflight.get(key) is futures[key]
                    ],
                    release=release,
                    token=token,
                    lease_key=lease_key,
                )

        async def await_other_replicas() -> None:
            left = await self._await_leased(space, contested, futures, budget)
            if left:
                await fetch_and_store(_by_entity(left), [])

        try:
            # What this process leased is stored as soon as it is fetched, never after
            # the wait for other replicas: two replicas each waiting on the other's
            # leases would otherwise both wait out CACHE_LEASE_WAIT_SECONDS.
            if contested:
                await asyncio.gather(fetch_and_store(fetching, held), await_other_replicas())
            else:  # (one task fewer between the lease reply and the CRM calls)
                await fetch_and_store(fetching, held)
        finally:
            for key, future in futures.items():
                if not future.done():
                    future.set_result(FAILED)
                if self._inflight.get(key) is future:
                    del self._inflight[key]

    async def _await_leased(
        self,
        space: str,
        pairs: list[tuple[Entity, str]],
        futures: dict[_Key, asyncio.Future[_Result]],
        budget: RedisBudget | None,
    ) -> list[tuple[Entity, str]]:
        """Wait for other replicas to store what they leased; what they did not, comes back,
        and so does everything once the request's Redis budget is spent."""
        if not pairs:
            return []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._policy.lease_wait
        stale_ms = self._policy.stale * 1000
        delay = _POLL_FIRST
        pending = list(pairs)
        given_up: list[tuple[Entity, str]] = []
        while pending and loop.time() < deadline:
            await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
            delay = min(delay * 2, _POLL_MAX)
            entries = await self._cache.read_leased(
                [self._cache.entity_key(e, space, i) for e, i in pending],
                self._cache.lease_key(space),
                self._cache.lease_fields(pending),
                budget,
            )
            if entries is None:
                break
            still: list[tuple[Entity, str]] = []
            for (entity, entity_id), (raw, pttl, leased) in zip(pending, entries, strict=True):
                if raw is not None and (not stale_ms or pttl < 0 or pttl > stale_ms):
                    futures[(entity, space, entity_id)].set_result(None if raw == NEGATIVE else raw)
                elif not leased:
                    given_up.append((entity, entity_id))  # the holder failed or gave up
                else:
                    still.append((entity, entity_id))
            pending = still
        if pending:
            log.info("lease.wait_expired", instance=instance_of(space), ids=len(pending))
        return given_up + pending


def _by_entity(pairs: Iterable[tuple[Entity, str]]) -> dict[Entity, list[str]]:
    """(entity, id) pairs as the ids of each entity, in order."""
    out: dict[Entity, list[str]] = {e: [] for e in ENTITIES}
    for entity, entity_id in pairs:
        out[entity].append(entity_id)
    return out
