"""`GET /contacts` around FastAPI's stack (app.routes.contacts.FastContacts): the same answers,
the same validation, the same log fields and metrics as the FastAPI route it stands for."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest
from fastapi import FastAPI
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from starlette.datastructures import QueryParams

from app.routes.contacts import AmbiguousInstance, _forwarded_query, fast_query
from app.validation import is_valid_instance
from simupstream.app import Failure
from tests.conftest import Service, Sim

#: Headers whose values differ from one request to the next whichever way it went.
_PER_REQUEST = {"x-request-id", "server-timing", "date"}


def _starlette_view(raw: str) -> tuple[str, str] | None:
    """What the FastAPI route accepts, by Starlette's parser and the route's own rules."""
    values = QueryParams(raw).getlist("instance")
    if len(values) != 1 or not is_valid_instance(values[0]):
        return None
    try:
        return values[0], _forwarded_query(raw.encode("latin-1"))
    except AmbiguousInstance:
        return None


class TestWhichRequestsTakeIt:
    @pytest.mark.parametrize(
        "raw",
        [
            "instance=acme",
            "instance=acme&page=2&per_page=40",
            "page=2&instance=acme&search=Jo%C3%A3o+Silva",
            "%69nstance=acme",  # the name percent-encoded
            "instance=ac%6De",
            "instance=acme&&x=1&",
            "instance=acme&instance=acme",  # repeated: the route's 422
            "instance=acme&%69nstance=other",
            "instance=ACME",
            "instance=",
            "instance",
            "instance=acme%00",
            "instance=acme+x",
            "instance=a%2Fb",
            "instances=acme",
            "x=1",
            "",
            "instance=" + "a" * 63,
            "instance=" + "a" * 64,
            "instance=café",
        ],
    )
    def test_exactly_the_queries_the_fastapi_route_serves(self, raw: str) -> None:
        assert fast_query(raw.encode("latin-1")) == _starlette_view(raw)

    def test_a_valid_query_is_taken_with_every_other_parameter_forwarded_as_sent(self) -> None:
        assert fast_query(b"page=2&instance=acme&search=Jo%C3%A3o+Silva") == (
            "acme",
            "page=2&search=Jo%C3%A3o+Silva",
        )

    @settings(max_examples=400, deadline=None)
    @given(
        st.lists(
            st.tuples(
                st.sampled_from(["instance", "%69nstance", "instanc%65", "page", "a+b", "", "x"]),
                st.sampled_from(["", "=", "=="]),
                st.text(alphabet="acmeA1_-%+2F6D=é&", max_size=8),
            ),
            max_size=5,
        )
    )
    def test_agrees_with_starlettes_parser_on_any_query(
        self, parts: list[tuple[str, str, str]]
    ) -> None:
        raw = "&".join(f"{name}{eq}{value}" for name, eq, value in parts)
        assert fast_query(raw.encode("utf-8")) == _starlette_view(
            raw.encode("utf-8").decode("latin-1")
        )


async def _both_ways(service: Service, path: str, **kwargs: Any) -> list[httpx.Response]:
    app = service.app
    assert isinstance(app, FastAPI)
    answers = []
    for fast in (True, False):
        app.fast_contacts = fast  # type: ignore[attr-defined]
        answers.append(await service.get(path, **kwargs))
    app.fast_contacts = True  # type: ignore[attr-defined]
    return answers


def _same_answer(fast: httpx.Response, routed: httpx.Response) -> None:
    assert fast.status_code == routed.status_code
    assert orjson.loads(fast.content) == orjson.loads(routed.content)
    assert [(k, v) for k, v in fast.headers.items() if k not in _PER_REQUEST] == [
        (k, v) for k, v in routed.headers.items() if k not in _PER_REQUEST
    ]
    assert set(fast.headers) == set(routed.headers)


class TestSameAnswers:
    @pytest.mark.parametrize(
        "path",
        [
            "/contacts?instance=acme&per_page=30",
            "/contacts?page=2&per_page=5&instance=acme&search=a",
            "/contacts?%69nstance=acme&per_page=3",
            "/contacts?instance=unknown-tenant",  # the upstream's 404, relayed
            "/contacts?instance=ACME",  # 422s: FastAPI's either way
            "/contacts?instance=acme&instance=acme",
            "/contacts?per_page=3",
        ],
    )
    async def test_as_the_fastapi_route(self, service: Service, path: str) -> None:
        await service.get(path)  # both ways then read a warm cache
        await service.settle()
        fast, routed = await _both_ways(service, path)
        _same_answer(fast, routed)

    async def test_upstream_failures_map_alike(self, service: Service, sim: Sim) -> None:
        for failure, status in [(Failure(status=500), 502), (Failure(status=401), 401)]:
            sim.state.fail["contacts"] = failure
            fast, routed = await _both_ways(service, "/contacts?instance=acme")
            assert fast.status_code == status
            _same_answer(fast, routed)
        sim.state.fail.pop("contacts")

    async def test_request_id_and_metrics_alike(self, service: Service) -> None:
        def served() -> float:
            return (
                REGISTRY.get_sample_value(
                    "http_requests_total",
                    {"method": "GET", "route": "/contacts", "status": "200"},
                )
                or 0.0
            )

        await service.get("/contacts?instance=acme&per_page=4")
        await service.settle()
        before = served()
        fast, routed = await _both_ways(
            service, "/contacts?instance=acme&per_page=4", headers={"x-request-id": "req-1"}
        )
        assert served() == before + 2
        assert fast.headers["x-request-id"] == routed.headers["x-request-id"] == "req-1"
        assert fast.headers["x-content-type-options"] == "nosniff"


class TestItBypassesFastAPI:
    async def test_a_valid_request_never_enters_fastapis_stack(
        self, service: Service, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        async def refused(*_: Any) -> None:
            raise AssertionError("FastAPI's stack was entered")

        monkeypatch.setattr(FastAPI, "__call__", refused)
        response = await service.get("/contacts?instance=acme&per_page=2")
        assert response.status_code == 200
        assert len(response.json()["data"]) == 2
        invalid = await service.get("/contacts?instance=ACME")  # FastAPI's to answer
        assert invalid.status_code == 500
