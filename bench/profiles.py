"""Page profiles: pre-rendered contacts pages and the CRM objects they reference.

A service's fixed cost per request weighs most on a light page, its cost per
byte and per id on a heavy one; one page flatters one design or the other, so
the warm and cold comparisons run on several. Every profile is a pure function
of its parameters: the same bytes on every run and for every target.

Every referenced id exists in the simulated CRM (`simupstream.data`'s rules,
with `SIM_USERS` users): the Node.js design does not cache "not found" and
would call the CRM for such an id on every request, so a page with one would
not be warm for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from simupstream import data

#: Users the simulator must have (`PUT /_sim/config`) for every profile's user to exist.
SIM_USERS = 100
#: One contact in this many has no customer, as on a real inbox (null customerId).
_NO_CUSTOMER_EVERY = 25
#: The contact fields of a light page (a phone book): the rest is a full contact.
_LIGHT_FIELDS = ("id", "phone", "name", "unreadCount")
#: Padding that makes a CRM customer of a fat profile ~700-800 bytes.
_NOTES = "Cliente desde 2019; prefere contato por WhatsApp à tarde, nunca às segundas. " * 6


@dataclass(frozen=True)
class Profile:
    """One kind of contacts page."""

    name: str
    contacts: int
    #: distinct customers the page references (fewer than contacts: some repeat)
    customers: int
    #: distinct users (agents) the page references
    users: int
    #: every field of the simulator's contact; else only id, phone, name, unreadCount
    full_contacts: bool = False
    #: customers with notes, an address and tags (~800 B) instead of the CRM's ~200 B
    fat_customers: bool = False
    summary: str = ""
    #: wrk connections of the warm runs. On the big page a request costs Node ~13 ms of its
    #: event loop here: at 32 connections one pass of the loop then outlasts Node's 250 ms
    #: Redis command timeout, which it takes for a miss, and it fetches the page's ids from
    #: the CRM: no longer a warm comparison. At 8 both stay warm.
    connections: int = 32

    def instance(self, suffix: str = "") -> str:
        """An instance name whose contacts page is this profile's file (see bench/nginx.py)."""
        return f"{self.name}-{suffix}" if suffix else self.name

    def customer_refs(self) -> list[int | str]:
        """The customer ids, as JSON has them: ints and "cus_<k>" strings, all existing."""
        ks = (k for k in range(1, 10 * self.customers + 100) if data.customer("x", k) is not None)
        return [data.customer_ref(k) for _, k in zip(range(self.customers), ks, strict=False)]

    def user_refs(self) -> list[int | str]:
        return [data.user_ref(k) for k in range(1, self.users + 1)]

    def page(self) -> bytes:
        """The contacts page the upstream serves, as `simupstream` shapes it."""
        customers, users = self.customer_refs(), self.user_refs()
        items = []
        for i in range(self.contacts):
            contact = data.contact(self.name, i)
            if not self.full_contacts:
                contact = {k: contact[k] for k in _LIGHT_FIELDS}
            no_customer = i % _NO_CUSTOMER_EVERY == _NO_CUSTOMER_EVERY - 1
            contact["customerId"] = None if no_customer else customers[i % len(customers)]
            contact["userId"] = users[i % len(users)]
            items.append(contact)
        return orjson.dumps(
            {"data": items, "page": 1, "per_page": self.contacts, "total": self.contacts}
        )

    def referenced(self) -> tuple[list[str], list[str]]:
        """The distinct customer and user ids of the page, as strings, in page order."""
        items = orjson.loads(self.page())["data"]
        cids = dict.fromkeys(str(c["customerId"]) for c in items if c["customerId"] is not None)
        uids = dict.fromkeys(str(c["userId"]) for c in items if c["userId"] is not None)
        return list(cids), list(uids)

    def cache_entries(self, instance: str) -> Iterator[tuple[str, bytes]]:
        """(key, value) of every object the page references, as the service and the Node.js
        design both cache them (`customer:<instance>:<id>`, compact JSON, no key prefix).
        The values are the same bytes whatever the instance: every target's page is equal."""
        cids, uids = self.referenced()
        for cid in cids:
            yield f"customer:{instance}:{cid}", orjson.dumps(self.customer(cid))
        for uid in uids:
            k = data.parse_user_id(uid)
            assert k is not None
            yield f"user:{instance}:{uid}", orjson.dumps(data.user(self.name, k, SIM_USERS))

    def customer(self, cid: str) -> dict[str, Any]:
        k = data.parse_customer_id(cid)
        obj = None if k is None else data.customer(self.name, k)
        assert obj is not None, cid
        if self.fat_customers:
            obj["notes"] = _NOTES[:400]
            obj["address"] = {
                "street": f"Rua das Flores {k}",
                "district": "Centro",
                "city": obj["city"],
                "zip": "01001-000",
            }
            obj["tags"] = ["vip", "b2b", "newsletter", "whatsapp"]
        return obj

    def enriched_bytes(self) -> int:
        """The size of the enriched page (compact JSON), as the service returns it."""
        page = orjson.loads(self.page())
        objects = {k: orjson.loads(v) for k, v in self.cache_entries(self.name)}
        for c in page["data"]:
            cid, uid = c["customerId"], c["userId"]
            c["customer"] = None if cid is None else objects[f"customer:{self.name}:{cid}"]
            c["user"] = None if uid is None else objects[f"user:{self.name}:{uid}"]
        return len(orjson.dumps(page))


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile(
            "light",
            contacts=100,
            customers=100,
            users=20,
            summary="100 contacts (id, phone, name), ~116 ids, CRM objects of ~200 B",
        ),
        Profile(
            "fat",
            contacts=100,
            customers=100,
            users=20,
            full_contacts=True,
            fat_customers=True,
            summary="100 full contacts, customers of ~730 B",
        ),
        Profile(
            "big",
            contacts=1000,
            customers=600,
            users=100,
            summary="1,000 contacts (id, phone, name), ~700 ids",
            connections=8,
        ),
    )
}


def parse(names: str) -> tuple[str, ...]:
    """`light,fat` -> ("light", "fat"); ValueError naming the known profiles otherwise."""
    wanted = tuple(n.strip() for n in names.split(",") if n.strip())
    unknown = [n for n in wanted if n not in PROFILES]
    if unknown or not wanted:
        raise ValueError(f"unknown profiles {unknown}; known: {', '.join(PROFILES)}")
    return wanted
