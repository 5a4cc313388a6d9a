"""The two kinds of CRM object a contact points to, named as in keys and metrics."""

from __future__ import annotations

from typing import Literal

Entity = Literal["customer", "user"]
ENTITIES: tuple[Entity, ...] = ("customer", "user")
