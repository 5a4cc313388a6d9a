"""The two input rules of docs/api.md: which instance names and entity ids are safe to use."""

from __future__ import annotations

import re
from typing import Final

INSTANCE_PATTERN: Final = r"^[a-z0-9][a-z0-9_-]{0,62}$"
_INSTANCE = re.compile(INSTANCE_PATTERN)
_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def is_valid_instance(name: str) -> bool:
    return _INSTANCE.fullmatch(name) is not None


def normalize_id(raw: object) -> str | None:
    """The id as the string used in keys and URLs, or None when it must never be looked up.

    Integers and strings are ids; booleans, floats, objects and anything that
    could escape a key or a URL (`..`, `/`, spaces, over 64 characters) are not.
    """
    if type(raw) is int:  # the common case (and not bool): digits and a sign are safe
        text = str(raw)
        return text if len(text) <= 64 else None
    if not isinstance(raw, str):
        return None  # bool, float, list, dict
    if raw in (".", "..") or _ID.fullmatch(raw) is None:
        return None
    return raw
