"""Tests of the simulated WhatsApp/CRM upstream (``simupstream``)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from simupstream import SimState, create_app
from simupstream import data as simdata

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def state() -> SimState:
    return SimState(customers=1000, users=20)


@pytest.fixture
async def client(state: SimState) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(state))
    async with httpx.AsyncClient(transport=transport, base_url="http://sim") as c:
        yield c


async def _page(client: httpx.AsyncClient, **params: Any) -> dict[str, Any]:
    r = await client.get("/acme/contacts", params=params)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    body: dict[str, Any] = r.json()
    return body


# --- data -------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_page_shape_and_determinism(client: httpx.AsyncClient) -> None:
    body = await _page(client, page=2, per_page=100)
    assert set(body) == {"data", "page", "per_page", "total", "query"}
    assert (body["page"], body["per_page"], body["total"]) == (2, 100, 1000)
    assert len(body["data"]) == 100
    first = body["data"][0]
    assert first["id"] == "ct_100"
    assert first["instance"] == "acme"
    for key in ("phone", "name", "customerId", "userId", "unreadCount", "lastMessage", "labels"):
        assert key in first
    assert "✓" in first["lastMessage"]["text"]
    assert isinstance(first["score"], float)
    # The same query always gives the same bytes, from a fresh app too.
    again = await client.get("/acme/contacts", params={"page": 2, "per_page": 100})
    fresh = httpx.ASGITransport(app=create_app(SimState(customers=1000, users=20)))
    async with httpx.AsyncClient(transport=fresh, base_url="http://sim") as other:
        third = await other.get("/acme/contacts", params={"page": 2, "per_page": 100})
    assert again.content == third.content
    # Default page size, last page, past the end.
    assert len((await _page(client))["data"]) == 50
    assert [c["id"] for c in (await _page(client, page=10, per_page=100))["data"]][-1] == "ct_999"
    assert (await _page(client, page=11, per_page=100))["data"] == []


@pytest.mark.asyncio
async def test_instances_differ(client: httpx.AsyncClient) -> None:
    a = (await client.get("/acme/customers", params={"ids": "1"})).json()["data"][0]
    b = (await client.get("/globex/customers", params={"ids": "1"})).json()["data"][0]
    assert a["id"] == b["id"] == 1
    assert (a["instance"], b["instance"]) == ("acme", "globex")
    assert "acme" in a["name"]
    assert "acme" in a["email"]
    assert a != b
    u = (await client.get("/globex/users", params={"ids": "1"})).json()["data"][0]
    assert u["email"] == "agent1@globex.example"
    assert u["instance"] == "globex"


@pytest.mark.asyncio
async def test_string_and_int_ids(client: httpx.AsyncClient) -> None:
    r = await client.get("/acme/customers", params={"ids": "1,2,cus_13,13,cus_17,17"})
    assert r.status_code == 200
    assert [c["id"] for c in r.json()["data"]] == [1, 2, "cus_13", 17]
    r = await client.get("/acme/users", params={"ids": "u_14,14,6,u_6"})
    assert [u["id"] for u in r.json()["data"]] == ["u_14", 6]
    # Contacts use the same forms.
    contacts = (await _page(client, per_page=20))["data"]
    assert contacts[2]["customerId"] == "cus_3"
    assert contacts[1]["customerId"] == 2
    assert contacts[6]["userId"] == "u_7"
    assert simdata.customer_ref(23) == "cus_23"
    assert simdata.user_ref(21) == "u_21"


@pytest.mark.asyncio
async def test_missing_ids_absent_and_null_refs(client: httpx.AsyncClient) -> None:
    r = await client.get("/acme/customers", params={"ids": "96,97,98,194,1001,0,abc"})
    assert [c["id"] for c in r.json()["data"]] == [96, 98]
    r = await client.get("/acme/users", params={"ids": "20,u_21"})  # user U+1 does not exist
    assert [u["id"] for u in r.json()["data"]] == [20]
    contacts = (await _page(client, per_page=100))["data"]
    assert contacts[96]["customerId"] == 97  # referenced, but missing in the CRM
    assert contacts[20]["userId"] == "u_21"  # referenced (string id), but missing
    assert contacts[10]["customerId"] is None
    assert contacts[21]["customerId"] is None
    assert contacts[12]["userId"] is None
    assert contacts[25]["userId"] is None
    assert contacts[0]["customerId"] == 1
    assert contacts[0]["userId"] == 1


@pytest.mark.asyncio
async def test_empty_and_too_many_ids(client: httpx.AsyncClient) -> None:
    assert (await client.get("/acme/customers", params={"ids": ""})).json() == {"data": []}
    assert (await client.get("/acme/users")).json() == {"data": []}
    ids = ",".join(str(i) for i in range(1, 101))
    assert (await client.get("/acme/customers", params={"ids": ids})).status_code == 200
    r = await client.get("/acme/customers", params={"ids": ids + ",101"})
    assert r.status_code == 400
    assert r.json() == {"detail": "too many ids"}


@pytest.mark.asyncio
async def test_bad_paging(client: httpx.AsyncClient) -> None:
    for params in ({"per_page": 1001}, {"per_page": 0}, {"page": 0}, {"page": "x"}):
        r = await client.get("/acme/contacts", params=params)
        assert r.status_code == 400
        assert "detail" in r.json()
    assert (await _page(client, per_page=1000))["per_page"] == 1000


@pytest.mark.asyncio
async def test_unknown_instance(client: httpx.AsyncClient) -> None:
    for path in ("/unknown-co/contacts", "/unknown/customers?ids=1", "/unknownx/users?ids=1"):
        r = await client.get(path)
        assert r.status_code == 404
        assert r.json() == {"detail": "unknown instance"}
    assert (await client.get("/Bad.Name/contacts")).status_code == 404
    assert (await client.get("/acme/nothing")).status_code == 404


@pytest.mark.asyncio
async def test_query_echo_search_dup_badids(client: httpx.AsyncClient, state: SimState) -> None:
    r = await client.get("/acme/contacts?per_page=5&status=open&x=1&x=2&empty=&q=S%C3%A3o")
    body = r.json()
    assert body["query"] == {"per_page": "5", "status": "open", "x": "2", "empty": "", "q": "São"}
    assert state.last_query["contacts"] == "per_page=5&status=open&x=1&x=2&empty=&q=S%C3%A3o"

    found = await _page(client, search="JOÃO", per_page=1000)
    assert found["total"] == len(found["data"]) > 0
    assert all("joão" in c["name"].casefold() for c in found["data"])

    dup = (await _page(client, dup=1, per_page=100))["data"]
    assert {c["customerId"] for c in dup} == {1, 2, "cus_3", 4, 5}
    assert {c["userId"] for c in dup} == {1, 2, 3}

    bad = (await _page(client, badids=1, per_page=60))["data"]
    refs = {c["customerId"] for c in bad} | {c["userId"] for c in bad}
    assert {"../etc", "..", "a b", "x" * 70}.issubset(refs)
    assert 2 in refs  # normal ids are mixed in


# --- auth, latency, failures -----------------------------------------------------------


@pytest.mark.asyncio
async def test_token(client: httpx.AsyncClient, state: SimState) -> None:
    r = await client.put("/_sim/config", json={"token": "s3cret"})
    assert r.status_code == 200
    assert r.json()["token"] == "s3cret"
    for auth in (None, "Bearer wrong", "bearer s3cret", "s3cret"):
        headers = {"Authorization": auth} if auth else {}
        r = await client.get("/acme/contacts", headers=headers)
        assert r.status_code == 401
        assert r.json() == {"detail": "unauthorized"}
    ok = {"Authorization": "Bearer s3cret"}
    assert (await client.get("/acme/contacts", headers=ok)).status_code == 200
    assert (await client.get("/acme/customers?ids=1", headers=ok)).status_code == 200
    assert (await client.get("/_sim/stats")).status_code == 200  # control API: no auth
    assert state.last_headers["contacts"]["authorization"] == "Bearer s3cret"
    state.token = None
    assert (await client.get("/acme/contacts")).status_code == 200


@pytest.mark.asyncio
async def test_latency(client: httpx.AsyncClient) -> None:
    await client.put("/_sim/config", json={"latency_ms": {"customers": 150}})
    start = time.perf_counter()
    assert (await client.get("/acme/customers?ids=1")).status_code == 200
    assert time.perf_counter() - start >= 0.14
    start = time.perf_counter()
    assert (await client.get("/acme/users?ids=1")).status_code == 200
    assert time.perf_counter() - start < 0.14


@pytest.mark.asyncio
async def test_failure_once_then_recovery(client: httpx.AsyncClient, state: SimState) -> None:
    r = await client.put("/_sim/config", json={"fail": {"customers": {"status": 503, "times": 1}}})
    assert r.json()["fail"]["customers"]["times"] == 1
    r = await client.get("/acme/customers?ids=1")
    assert r.status_code == 503
    assert "detail" in r.json()
    assert (await client.get("/acme/customers?ids=1")).status_code == 200
    assert (await client.get("/_sim/config")).json()["fail"]["customers"] is None

    await client.put("/_sim/config", json={"fail": {"contacts": {"status": 200, "body": "nope"}}})
    for _ in range(2):  # times=null: until cleared
        r = await client.get("/acme/contacts")
        assert (r.status_code, r.text) == (200, "nope")
    await client.put("/_sim/config", json={"fail": {"contacts": None}})
    assert (await client.get("/acme/contacts")).json()["data"]
    assert state.calls["contacts"] == 3
    assert state.calls["customers"] == 2


@pytest.mark.asyncio
async def test_hang(client: httpx.AsyncClient) -> None:
    await client.put("/_sim/config", json={"fail": {"users": {"hang": True, "times": 1}}})
    # ASGITransport ignores httpx timeouts, so bound the call ourselves.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(client.get("/acme/users?ids=1"), 0.2)
    assert (await client.get("/acme/users?ids=1")).status_code == 200


@pytest.mark.asyncio
async def test_bad_config_rejected(client: httpx.AsyncClient) -> None:
    bodies: list[Any] = [
        {"latency_ms": {"nope": 1}},
        {"latency_ms": {"users": -1}},
        {"fail": {"users": {"status": 99}}},
        {"fail": {"users": {"times": 0}}},
        {"whatever": 1},
        [],
    ]
    for body in bodies:
        r = await client.put("/_sim/config", json=body)
        assert r.status_code == 400, body
    assert (await client.put("/_sim/config", content=b"{not json")).status_code == 400
    config = (await client.get("/_sim/config")).json()
    assert config["latency_ms"] == {"contacts": 0, "customers": 0, "users": 0}
    assert config["fail"] == {"contacts": None, "customers": None, "users": None}


# --- stats and reset -----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_stats_and_reset(client: httpx.AsyncClient, state: SimState) -> None:
    await client.get("/acme/contacts?page=1&per_page=10", headers={"X-Request-ID": "abc"})
    await client.get("/acme/customers", params={"ids": "1,2,cus_13"})
    await client.get("/acme/customers", params={"ids": "1"})
    await client.get("/globex/customers", params={"ids": "1"})
    await client.get("/acme/users", params={"ids": "1,2"})

    stats = (await client.get("/_sim/stats")).json()
    assert stats["calls"] == {"contacts": 1, "customers": 3, "users": 1}
    assert stats["ids_requested"] == {"customers": 5, "users": 2}
    assert stats["unique_ids_requested"] == {"customers": 4, "users": 2}
    assert stats["max_fetches_per_id"] == {"customers": 2, "users": 1}
    assert stats["batch_sizes"] == {"customers": [3, 1, 1], "users": [2]}
    assert stats["last_headers"]["contacts"]["x-request-id"] == "abc"
    assert stats["last_query"]["contacts"] == "page=1&per_page=10"
    assert state.fetch_count("customers", "acme", 1) == 2
    assert state.fetch_count("customers", "globex", 1) == 1
    assert state.fetch_count("customers", "acme", "cus_13") == 1
    detail = (await client.get("/_sim/stats?per_id=1")).json()["fetches_per_id"]
    assert detail["customers"]["acme:1"] == 2

    # Cached pages are still counted.
    await client.get("/acme/contacts?page=1&per_page=10")
    assert state.calls["contacts"] == 2

    await client.put("/_sim/config", json={"latency_ms": {"users": 5}})
    assert (await client.post("/_sim/reset")).status_code == 200
    stats = (await client.get("/_sim/stats")).json()
    assert stats["calls"] == {"contacts": 0, "customers": 0, "users": 0}
    assert stats["max_fetches_per_id"] == {"customers": 0, "users": 0}
    assert stats["batch_sizes"] == {"customers": [], "users": []}
    assert state.latency_ms["users"] == 5  # config kept
    await client.post("/_sim/reset?config=1")
    assert state.latency_ms["users"] == 0


@pytest.mark.asyncio
async def test_healthz_and_methods(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.post("/acme/contacts")).status_code == 405
    assert (await client.get("/_sim/reset")).status_code == 405


# --- as a process ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_runs_as_a_process() -> None:
    port = _free_port()
    env = {**os.environ, "SIM_TOKEN": "tok", "SIM_LATENCY_MS": "users=1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "simupstream", "--port", str(port), "--customers", "500"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 8
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                if httpx.get(f"{base}/healthz", timeout=0.5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "simupstream did not start"
            time.sleep(0.05)
        with httpx.Client(base_url=base, timeout=2) as c:
            assert c.get("/acme/contacts").status_code == 401
            page = c.get("/acme/contacts", headers={"Authorization": "Bearer tok"}).json()
            assert page["total"] == 500
            config = c.get("/_sim/config").json()
            assert config["latency_ms"] == {"contacts": 0, "customers": 0, "users": 1}
            c.put("/_sim/config", json={"fail": {"contacts": {"hang": True, "times": 1}}})
            with pytest.raises(httpx.ReadTimeout):
                c.get("/acme/contacts", headers={"Authorization": "Bearer tok"}, timeout=0.3)
            assert c.get("/_sim/stats").json()["calls"]["contacts"] == 3
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
