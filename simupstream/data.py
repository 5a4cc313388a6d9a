"""Synthetic, deterministic upstream data.

Every object is a pure function of the instance name and an index, so the
simulator stores nothing per id: 100,000 customers cost no memory, and any
two processes (or test runs) agree on every byte.

Rules (``N`` customers, ``U`` users):

* instance names match ``^[a-z0-9][a-z0-9_-]{0,62}$``; names starting with
  ``unknown`` do not exist;
* customer ``k`` (1..N) has the string id ``"cus_<k>"`` when ``k % 10 == 3``,
  the integer ``k`` otherwise; customers with ``k % 97 == 0`` do not exist;
* user ``k`` (1..U) has the string id ``"u_<k>"`` when ``k % 7 == 0``, the
  integer ``k`` otherwise; user ``U + 1`` is referenced but does not exist;
* contact ``i`` (0-based, ``N`` of them) references customer
  ``1 + i % N`` and user ``1 + i % (U + 1)``; ``customerId`` is ``null``
  when ``i % 11 == 10`` and ``userId`` is ``null`` when ``i % 13 == 12``.
"""

from __future__ import annotations

import re
import time
import zlib
from functools import lru_cache
from typing import Any, Final

INSTANCE_RE: Final = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")

DEFAULT_CUSTOMERS: Final = 100_000
DEFAULT_USERS: Final = 50
#: ``search=`` only scans this many contacts, to keep a search cheap.
SEARCH_WINDOW: Final = 5_000

#: Malformed ids served with ``badids=1``: a service must never look them up.
BAD_IDS: Final[tuple[str, ...]] = (
    "../etc",
    "a b",
    "..",
    ".",
    "x" * 70,
    "",
    "a/b",
    "ü",
    "1?x=1",
    "*",
)

_FIRST: Final = (
    "João",
    "Maria",
    "Zoë",
    "Ana",
    "José",
    "Lucía",
    "Pedro",
    "Beatriz",
    "Chloé",
    "Rafael",
    "Ingrid",
    "Thiago",
    "Fernanda",
    "Björn",
    "Camila",
    "Luís",
)
_LAST: Final = (
    "Silva",
    "Souza",
    "Oliveira",
    "Conceição",
    "Müller",
    "Pereira",
    "Gonçalves",
    "Almeida",
    "Núñez",
    "Costa",
    "Ribeiro",
    "Carvalho",
    "Araújo",
)
_CITIES: Final = ("São Paulo", "Rio de Janeiro", "Belém", "Curitiba", "Goiânia", "Brasília")
_TIERS: Final = ("bronze", "silver", "gold", "platinum")
_TAGS: Final = ("vip", "b2b", "late-payer", "newsletter", "whatsapp", "ação", "🚀")
_LABELS: Final = ("lead", "support", "billing", "urgent", "follow-up", "ñ")
_TEAMS: Final = ("sales", "support", "billing")
#: 2026-03-01T12:00:00Z; contact ``i``'s last message is ``97 * i`` s older.
_EPOCH: Final = 1_772_366_400


def instance_exists(instance: str) -> bool:
    """Whether the upstream knows this instance (tenant)."""
    return INSTANCE_RE.match(instance) is not None and not instance.startswith("unknown")


@lru_cache(maxsize=1024)
def _seed(instance: str) -> int:
    """A per-instance number that makes every instance's data different."""
    return zlib.crc32(instance.encode())


# --- ids ---------------------------------------------------------------------


def customer_ref(k: int) -> int | str:
    """The id of customer ``k`` as it appears in JSON (int or ``"cus_<k>"``)."""
    return f"cus_{k}" if k % 10 == 3 else k


def user_ref(k: int) -> int | str:
    """The id of user ``k`` as it appears in JSON (int or ``"u_<k>"``)."""
    return f"u_{k}" if k % 7 == 0 else k


def _decimal(text: str) -> int | None:
    """``text`` as a canonical non-negative decimal, or ``None``."""
    if not text or len(text) > 18 or not text.isascii() or not text.isdigit():
        return None
    if len(text) > 1 and text[0] == "0":
        return None
    return int(text)


def parse_customer_id(raw: str) -> int | None:
    """The index of the customer whose id is ``raw`` (its text form), if any.

    Only the canonical form is accepted: ``"cus_13"`` names customer 13, but
    ``"13"`` names nothing, as ``"cus_17"`` does (17 is an integer id).
    """
    if raw.startswith("cus_"):
        k = _decimal(raw[4:])
        return k if k is not None and k % 10 == 3 else None
    k = _decimal(raw)
    return k if k is not None and k % 10 != 3 else None


def parse_user_id(raw: str) -> int | None:
    """The index of the user whose id is ``raw`` (its text form), if any."""
    if raw.startswith("u_"):
        k = _decimal(raw[2:])
        return k if k is not None and k % 7 == 0 else None
    k = _decimal(raw)
    return k if k is not None and k % 7 != 0 else None


# --- objects -------------------------------------------------------------------


def customer(instance: str, k: int, customers: int = DEFAULT_CUSTOMERS) -> dict[str, Any] | None:
    """CRM customer ``k`` of ``instance``, or ``None`` when it does not exist."""
    if k < 1 or k > customers or k % 97 == 0:
        return None
    h = _seed(instance)
    mix = ((k * 2_654_435_761) ^ h) & 0xFFFFFFFF
    return {
        "id": customer_ref(k),
        "name": f"Customer {k} of {instance}",
        "email": f"c{k}@{instance}.example",
        "instance": instance,
        "phone": f"+5511{9_0000_0000 + mix % 1_0000_0000}",
        "tier": _TIERS[mix % 4],
        "tags": [_TAGS[(k + h) % 7], _TAGS[(k * 3 + h) % 7]] if k % 4 else [],
        "balance": (mix % 1_000_000 + 50) / 100,  # cents / 100: a short, exact repr
        "city": _CITIES[(k + h) % len(_CITIES)],
        "vip": k % 5 == 0,
        "notes": None,
    }


def user(instance: str, k: int, users: int = DEFAULT_USERS) -> dict[str, Any] | None:
    """Agent (user) ``k`` of ``instance``, or ``None`` when it does not exist."""
    if k < 1 or k > users:
        return None
    return {
        "id": user_ref(k),
        "name": f"Agent {k}",
        "email": f"agent{k}@{instance}.example",
        "instance": instance,
        "team": _TEAMS[k % 3],
        "active": k % 9 != 0,
    }


def contact_name(instance: str, i: int) -> str:
    """Display name of contact ``i`` (cheap: used to scan for ``search=``)."""
    h = _seed(instance)
    return f"{_FIRST[(i + h) % 16]} {_LAST[(i * 7 + h) % 13]}"


@lru_cache(maxsize=64)
def folded_names(instance: str, count: int) -> tuple[str, ...]:
    """Case-folded names of the first ``count`` contacts, for ``search=``."""
    return tuple(contact_name(instance, i).casefold() for i in range(count))


@lru_cache(maxsize=4096)
def _date(day: int) -> str:
    """``YYYY-MM-DD`` of a day number since the Unix epoch."""
    return time.strftime("%Y-%m-%d", time.gmtime(day * 86_400))


def contact(
    instance: str,
    i: int,
    customers: int = DEFAULT_CUSTOMERS,
    users: int = DEFAULT_USERS,
    *,
    dup: bool = False,
    badids: bool = False,
) -> dict[str, Any]:
    """WhatsApp contact ``i`` (0-based) of ``instance``.

    ``dup`` makes every contact reference customers 1..5 and users 1..3 (no
    nulls), to test deduplication; ``badids`` replaces every third contact's
    references with malformed ids from :data:`BAD_IDS`.
    """
    h = _seed(instance)
    cid: int | str | None
    uid: int | str | None
    if dup:
        cid = customer_ref(1 + i % 5)
        uid = user_ref(1 + i % 3)
    else:
        cid = None if i % 11 == 10 else customer_ref(1 + i % customers)
        uid = None if i % 13 == 12 else user_ref(1 + i % (users + 1))
    if badids and i % 3 == 0:
        cid = BAD_IDS[(i // 3) % len(BAD_IDS)]
        uid = BAD_IDS[(i // 3 + 1) % len(BAD_IDS)]
    first = _FIRST[(i + h) % 16]
    day, second = divmod(_EPOCH - 97 * i, 86_400)
    minute, second = divmod(second, 60)
    hour, minute = divmod(minute, 60)
    at = f"{_date(day)}T{hour:02d}:{minute:02d}:{second:02d}Z"
    return {
        "id": f"ct_{i}",
        "instance": instance,
        "phone": f"+5521{9_0000_0000 + (i * 104_729 + h) % 1_0000_0000}",
        "waId": 5_521_900_000_000 + i,
        "name": f"{first} {_LAST[(i * 7 + h) % 13]}",
        "customerId": cid,
        "userId": uid,
        "unreadCount": i % 5,
        "score": (i % 1000 * 10 + 5) / 100,
        "pinned": i % 17 == 0,
        "avatarUrl": None,
        "lastMessage": {
            "text": f'Olá {first}! Pedido #{i} "confirmado" ✓ 🚀',
            "at": at,
            "fromMe": i % 2 == 0,
        },
        "labels": [_LABELS[i % 6], _LABELS[(i + h) % 6]] if i % 3 else [],
    }
