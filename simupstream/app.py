"""The simulated WhatsApp/CRM upstream as a raw ASGI application.

No framework on purpose: this is the upstream of a benchmark, so it must cost
as little CPU as possible. Routes:

* ``GET /{instance}/contacts``, ``GET /{instance}/customers?ids=``,
  ``GET /{instance}/users?ids=``: the data endpoints (see :mod:`.data`);
* ``GET|PUT /_sim/config``, ``GET /_sim/stats``, ``POST /_sim/reset``: the
  control API, never behind the token;
* ``GET /healthz``.

All mutable state (config and counters) is one :class:`SimState`, shared by
the HTTP control API and by tests that run the app in-process.
"""

from __future__ import annotations

import asyncio
import copy
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Final
from urllib.parse import parse_qsl

import orjson

from . import data

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

ENDPOINTS: Final = ("contacts", "customers", "users")
CRM_ENDPOINTS: Final = ("customers", "users")
MAX_IDS: Final = 100
MAX_PER_PAGE: Final = 1000
DEFAULT_PER_PAGE: Final = 50
BATCH_HISTORY: Final = 1000
#: Rendered contact pages kept, bounded by total size.
PAGE_CACHE_BYTES: Final = 32 * 1024 * 1024
#: Rendered CRM objects kept (about 400 bytes each).
OBJECT_CACHE_SIZE: Final = 32_768


class BadRequest(Exception):
    """A request the simulator answers with 400 and this detail."""


@dataclass
class Failure:
    """An injected failure for one endpoint.

    ``times`` is how many more calls fail (``None``: until cleared); ``body``
    replaces the default JSON error body verbatim (e.g. ``"not json"``);
    ``hang`` never answers, until the client disconnects.
    """

    status: int = 500
    times: int | None = None
    body: str | None = None
    hang: bool = False
    content_type: str = "application/json"

    @classmethod
    def from_json(cls, value: Any) -> Failure:
        """Build from the control API's JSON; ``ValueError`` when malformed."""
        if not isinstance(value, dict):
            raise ValueError("a failure must be an object or null")
        unknown = set(value) - {"status", "times", "body", "hang", "content_type"}
        if unknown:
            raise ValueError(f"unknown failure fields: {sorted(unknown)}")
        status = value.get("status", 500)
        times = value.get("times")
        body = value.get("body")
        hang = value.get("hang", False)
        ctype = value.get("content_type", "application/json")
        if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
            raise ValueError("status must be an HTTP status code")
        if times is not None and (
            not isinstance(times, int) or isinstance(times, bool) or times < 1
        ):
            raise ValueError("times must be a positive integer or null")
        if body is not None and not isinstance(body, str):
            raise ValueError("body must be a string or null")
        if not isinstance(hang, bool):
            raise ValueError("hang must be a boolean")
        if not isinstance(ctype, str):
            raise ValueError("content_type must be a string")
        return cls(status=status, times=times, body=body, hang=hang, content_type=ctype)

    def to_json(self) -> dict[str, Any]:
        """The control API's JSON form."""
        return {
            "status": self.status,
            "times": self.times,
            "body": self.body,
            "hang": self.hang,
            "content_type": self.content_type,
        }


def _per_endpoint(value: Any) -> dict[str, Any]:
    return {name: copy.copy(value) for name in ENDPOINTS}


@dataclass
class SimState:
    """Configuration and counters of one simulator.

    Construct it with the startup configuration; ``reset(config=True)``
    restores exactly that. Tests may read and change the fields directly.
    """

    customers: int = data.DEFAULT_CUSTOMERS
    users: int = data.DEFAULT_USERS
    token: str | None = None
    latency_ms: dict[str, float] = field(default_factory=lambda: _per_endpoint(0.0))
    fail: dict[str, Failure | None] = field(default_factory=lambda: _per_endpoint(None))

    calls: dict[str, int] = field(default_factory=lambda: _per_endpoint(0), init=False)
    ids_requested: dict[str, int] = field(init=False)
    fetch_counts: dict[str, dict[tuple[str, str], int]] = field(init=False)
    max_fetches: dict[str, int] = field(init=False)
    last_headers: dict[str, dict[str, str]] = field(init=False)
    last_query: dict[str, str] = field(init=False)
    batch_sizes: dict[str, deque[int]] = field(init=False)
    page_cache: OrderedDict[tuple[str, bytes, int, int], bytes] = field(
        default_factory=OrderedDict, init=False, repr=False
    )
    page_cache_size: int = field(default=0, init=False, repr=False)
    _initial: dict[str, Any] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ENDPOINTS:
            self.latency_ms.setdefault(name, 0.0)
            self.fail.setdefault(name, None)
        self._initial = copy.deepcopy(self.config())
        self.reset()

    # --- configuration ---------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """The configuration as the control API shows it."""
        return {
            "latency_ms": dict(self.latency_ms),
            "fail": {k: (f.to_json() if f else None) for k, f in self.fail.items()},
            "token": self.token,
            "customers": self.customers,
            "users": self.users,
        }

    def update_config(self, patch: Any) -> None:
        """Apply a partial update; ``ValueError`` (and no change) if invalid."""
        if not isinstance(patch, dict):
            raise ValueError("the body must be a JSON object")
        unknown = set(patch) - {"latency_ms", "fail", "token", "customers", "users"}
        if unknown:
            raise ValueError(f"unknown config fields: {sorted(unknown)}")
        latency = dict(self.latency_ms)
        fail = dict(self.fail)
        token, customers, users = self.token, self.customers, self.users
        if "latency_ms" in patch:
            value = patch["latency_ms"]
            if not isinstance(value, dict):
                raise ValueError("latency_ms must be an object")
            for name, ms in value.items():
                if name not in ENDPOINTS:
                    raise ValueError(f"unknown endpoint {name!r}")
                if not isinstance(ms, int | float) or isinstance(ms, bool) or ms < 0:
                    raise ValueError("latencies must be non-negative numbers")
                latency[name] = float(ms)
        if "fail" in patch:
            value = patch["fail"]
            if not isinstance(value, dict):
                raise ValueError("fail must be an object")
            for name, spec in value.items():
                if name not in ENDPOINTS:
                    raise ValueError(f"unknown endpoint {name!r}")
                fail[name] = None if spec is None else Failure.from_json(spec)
        if "token" in patch:
            token = patch["token"]
            if token is not None and (not isinstance(token, str) or not token):
                raise ValueError("token must be a non-empty string or null")
        for key in ("customers", "users"):
            if key in patch:
                n = patch[key]
                if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                    raise ValueError(f"{key} must be a positive integer")
        customers = patch.get("customers", customers)
        users = patch.get("users", users)
        self.latency_ms, self.fail = latency, fail
        self.token, self.customers, self.users = token, customers, users

    def reset(self, *, config: bool = False) -> None:
        """Zero every counter; with ``config``, restore the startup config too."""
        if config:
            initial = self._initial
            self.latency_ms = dict(initial["latency_ms"])
            self.fail = {
                k: (Failure.from_json(v) if v else None) for k, v in initial["fail"].items()
            }
            self.token = initial["token"]
            self.customers = initial["customers"]
            self.users = initial["users"]
        self.calls = _per_endpoint(0)
        self.ids_requested = {name: 0 for name in CRM_ENDPOINTS}
        self.fetch_counts = {name: {} for name in CRM_ENDPOINTS}
        self.max_fetches = {name: 0 for name in CRM_ENDPOINTS}
        self.last_headers = {name: {} for name in ENDPOINTS}
        self.last_query = {name: "" for name in ENDPOINTS}
        self.batch_sizes = {name: deque(maxlen=BATCH_HISTORY) for name in CRM_ENDPOINTS}

    # --- counters --------------------------------------------------------------

    def record_call(
        self, endpoint: str, headers: Iterable[tuple[bytes, bytes]], query: str
    ) -> None:
        """Count one call of ``endpoint`` and remember its headers and query."""
        self.calls[endpoint] += 1
        seen: dict[str, str] = {}
        for raw_name, raw_value in headers:
            name = raw_name.decode("latin-1").lower()
            value = raw_value.decode("latin-1")
            seen[name] = f"{seen[name]}, {value}" if name in seen else value
        self.last_headers[endpoint] = seen
        self.last_query[endpoint] = query

    def record_ids(self, endpoint: str, instance: str, ids: list[str]) -> None:
        """Count a CRM batch: its size and every id in it (repeats included)."""
        self.batch_sizes[endpoint].append(len(ids))
        self.ids_requested[endpoint] += len(ids)
        counts = self.fetch_counts[endpoint]
        top = self.max_fetches[endpoint]
        for raw in ids:
            n = counts.get((instance, raw), 0) + 1
            counts[(instance, raw)] = n
            if n > top:
                top = n
        self.max_fetches[endpoint] = top

    def fetch_count(self, endpoint: str, instance: str, raw_id: int | str) -> int:
        """How many times the CRM was asked for this id (in its text form)."""
        return self.fetch_counts[endpoint].get((instance, str(raw_id)), 0)

    def take_failure(self, endpoint: str) -> Failure | None:
        """The failure to inject into this call, consuming one of its ``times``."""
        failure = self.fail.get(endpoint)
        if failure is None:
            return None
        if failure.times is not None:
            failure.times -= 1
            if failure.times <= 0:
                self.fail[endpoint] = None
        return failure

    def stats(self, *, per_id: bool = False) -> dict[str, Any]:
        """The counters as ``GET /_sim/stats`` shows them."""
        out: dict[str, Any] = {
            "calls": dict(self.calls),
            "ids_requested": dict(self.ids_requested),
            "unique_ids_requested": {k: len(v) for k, v in self.fetch_counts.items()},
            "max_fetches_per_id": dict(self.max_fetches),
            "last_headers": {k: dict(v) for k, v in self.last_headers.items()},
            "last_query": dict(self.last_query),
            "batch_sizes": {k: list(v) for k, v in self.batch_sizes.items()},
        }
        if per_id:
            out["fetches_per_id"] = {
                endpoint: {f"{inst}:{raw}": n for (inst, raw), n in counts.items()}
                for endpoint, counts in self.fetch_counts.items()
            }
        return out

    # --- rendered pages ----------------------------------------------------------

    def cached_page(self, key: tuple[str, bytes, int, int]) -> bytes | None:
        """A previously rendered contacts page, refreshed as most recent."""
        body = self.page_cache.get(key)
        if body is not None:
            self.page_cache.move_to_end(key)
        return body

    def cache_page(self, key: tuple[str, bytes, int, int], body: bytes) -> None:
        """Remember a rendered page, evicting the oldest beyond the byte budget."""
        if len(body) > PAGE_CACHE_BYTES // 8 or key in self.page_cache:
            return
        body = _compact(body)
        self.page_cache[key] = body
        self.page_cache_size += len(body)
        while self.page_cache_size > PAGE_CACHE_BYTES:
            _, old = self.page_cache.popitem(last=False)
            self.page_cache_size -= len(old)


# --- rendering ---------------------------------------------------------------------


def _int_param(query: dict[str, str], name: str, default: int) -> int:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be an integer") from None


def _flag(query: dict[str, str], name: str) -> bool:
    return query.get(name, "").lower() in ("1", "true", "yes")


def render_contacts(state: SimState, instance: str, query: dict[str, str]) -> bytes:
    """The contacts page body for ``query``; :class:`BadRequest` if invalid."""
    page = _int_param(query, "page", 1)
    per_page = _int_param(query, "per_page", DEFAULT_PER_PAGE)
    if page < 1:
        raise BadRequest("page must be >= 1")
    if per_page < 1 or per_page > MAX_PER_PAGE:
        raise BadRequest(f"per_page must be between 1 and {MAX_PER_PAGE}")
    n, u = state.customers, state.users
    dup, badids = _flag(query, "dup"), _flag(query, "badids")
    start = (page - 1) * per_page
    search = query.get("search", "")
    indexes: range | list[int]
    if search:
        needle = search.casefold()
        names = data.folded_names(instance, min(n, data.SEARCH_WINDOW))
        matches = [i for i, name in enumerate(names) if needle in name]
        total = len(matches)
        indexes = matches[start : start + per_page]
    else:
        total = n
        indexes = range(min(start, n), min(start + per_page, n))
    items = [data.contact(instance, i, n, u, dup=dup, badids=badids) for i in indexes]
    return orjson.dumps(
        {"data": items, "page": page, "per_page": per_page, "total": total, "query": query}
    )


def split_ids(query: list[tuple[str, str]]) -> list[str]:
    """The ids of ``ids=1,2,cus_13`` (repeated ``ids`` params are joined)."""
    out: list[str] = []
    for key, value in query:
        if key == "ids":
            out.extend(part for part in (p.strip() for p in value.split(",")) if part)
    return out


def _compact(body: bytes) -> bytes:
    """A copy of ``body`` without orjson's spare capacity (>= 4 KiB each), so
    that cached bodies cost what they weigh."""
    return memoryview(body).tobytes()


@lru_cache(maxsize=OBJECT_CACHE_SIZE)
def _customer_json(instance: str, k: int, customers: int) -> bytes | None:
    obj = data.customer(instance, k, customers)
    return None if obj is None else _compact(orjson.dumps(obj))


@lru_cache(maxsize=OBJECT_CACHE_SIZE)
def _user_json(instance: str, k: int, users: int) -> bytes | None:
    obj = data.user(instance, k, users)
    return None if obj is None else _compact(orjson.dumps(obj))


def lookup(state: SimState, endpoint: str, instance: str, ids: list[str]) -> bytes:
    """The CRM answer for ``ids``: the objects that exist, in request order,
    without repeats, as ``{"data": [...]}`` bytes.

    Objects are rendered once each into a bounded LRU and joined, since the
    same ids come back page after page when the service does not cache.
    """
    if endpoint == "customers":
        parse, render, count = data.parse_customer_id, _customer_json, state.customers
    else:
        parse, render, count = data.parse_user_id, _user_json, state.users
    seen: set[int] = set()
    parts: list[bytes] = []
    for raw in ids:
        k = parse(raw)
        if k is None or k in seen:
            continue
        seen.add(k)
        obj = render(instance, k, count)
        if obj is not None:
            parts.append(obj)
    return b'{"data":[' + b",".join(parts) + b"]}"


# --- ASGI ----------------------------------------------------------------------------


async def _respond(
    send: Send, status: int, body: bytes, content_type: bytes = b"application/json"
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _error(send: Send, status: int, detail: str) -> None:
    await _respond(send, status, orjson.dumps({"detail": detail}))


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _hang(receive: Receive) -> None:
    """Never answer: wait until the client disconnects (or we are cancelled)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class SimApp:
    """The ASGI callable; ``state`` is its :class:`SimState`."""

    def __init__(self, state: SimState) -> None:
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Dispatch one ASGI connection (``http`` or ``lifespan``)."""
        kind = scope["type"]
        if kind == "http":
            path: str = scope["path"]
            if path == "/healthz" or path.startswith("/_sim/"):
                await self._control(scope, receive, send, path)
                return
            parts = path.split("/")
            if len(parts) == 3 and parts[2] in ENDPOINTS:
                await self._data(scope, receive, send, parts[1], parts[2])
                return
            await _error(send, 404, "not found")
        elif kind == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    async def _data(
        self, scope: Scope, receive: Receive, send: Send, instance: str, endpoint: str
    ) -> None:
        state = self.state
        raw_query: bytes = scope["query_string"]
        query_text = raw_query.decode("utf-8", "replace")
        state.record_call(endpoint, scope["headers"], query_text)
        if scope["method"] != "GET":
            await _error(send, 405, "method not allowed")
            return
        if state.token is not None:
            expected = b"Bearer " + state.token.encode()
            if not any(k == b"authorization" and v == expected for k, v in scope["headers"]):
                await _error(send, 401, "unauthorized")
                return
        if not data.instance_exists(instance):
            await _error(send, 404, "unknown instance")
            return

        body: bytes | None = None
        if endpoint == "contacts":
            key = (instance, raw_query, state.customers, state.users)
            body = state.cached_page(key)
            if body is None:
                pairs = parse_qsl(query_text, keep_blank_values=True)
                try:
                    body = render_contacts(state, instance, dict(pairs))
                except BadRequest as exc:
                    await _error(send, 400, str(exc))
                    return
                state.cache_page(key, body)
        else:
            ids = split_ids(parse_qsl(query_text, keep_blank_values=True))
            if len(ids) > MAX_IDS:
                await _error(send, 400, "too many ids")
                return
            state.record_ids(endpoint, instance, ids)

        latency = state.latency_ms.get(endpoint, 0.0)
        if latency > 0:
            await asyncio.sleep(latency / 1000)
        failure = state.take_failure(endpoint)
        if failure is not None:
            if failure.hang:
                await _hang(receive)
                return
            if failure.body is not None:
                payload = failure.body.encode()
            else:
                payload = orjson.dumps({"detail": f"simulated failure ({failure.status})"})
            await _respond(send, failure.status, payload, failure.content_type.encode())
            return
        if body is None:
            body = lookup(state, endpoint, instance, ids)
        await _respond(send, 200, body)

    async def _control(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        state = self.state
        method: str = scope["method"]
        query = dict(parse_qsl(scope["query_string"].decode("utf-8", "replace")))
        if path == "/healthz" and method == "GET":
            await _respond(send, 200, b'{"status":"ok"}')
        elif path == "/_sim/config" and method == "GET":
            await _respond(send, 200, orjson.dumps(state.config()))
        elif path == "/_sim/config" and method in ("PUT", "PATCH"):
            raw = await _read_body(receive)
            try:
                state.update_config(orjson.loads(raw or b"{}"))
            except (ValueError, orjson.JSONDecodeError) as exc:
                await _error(send, 400, str(exc))
                return
            await _respond(send, 200, orjson.dumps(state.config()))
        elif path == "/_sim/stats" and method == "GET":
            per_id = _flag(query, "per_id")
            await _respond(send, 200, orjson.dumps(state.stats(per_id=per_id)))
        elif path == "/_sim/reset" and method == "POST":
            state.reset(config=_flag(query, "config"))
            await _respond(send, 200, orjson.dumps({"reset": True, "config": state.config()}))
        elif path in ("/healthz", "/_sim/config", "/_sim/stats", "/_sim/reset"):
            await _error(send, 405, "method not allowed")
        else:
            await _error(send, 404, "not found")


def create_app(state: SimState | None = None) -> SimApp:
    """A simulator app around ``state`` (a fresh default one when omitted)."""
    return SimApp(state if state is not None else SimState())


app = create_app()
