"""structlog on top of stdlib logging: JSON lines in production, readable lines at a terminal.

The app's own events go through structlog; uvicorn's (and any library's)
stdlib records are rendered by the same processors, so every line of the
process has one format and carries the request id bound by the middleware.

Secrets never reach the output: fields named like a credential are replaced,
`Bearer`/`Basic` credentials and `user:password@` in URLs are masked in every
string, and the values given to `configure_logging(secrets=...)` are masked
wherever they appear, tracebacks included.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable
from typing import Any

import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

_HANDLER_NAME = "app.logging"
_REDACTED = "[redacted]"
_SECRET_FIELD = re.compile(r"authorization|token|password|passwd|secret|cookie|api_?key", re.I)
_CREDENTIAL = re.compile(
    # An Authorization header value: "Bearer x" as sent, or any case when x looks like a token.
    r"\b(?P<scheme>Bearer|BEARER)\s+[^\s\"',;]+"
    r"|\b(?P<anycase>(?i:bearer))\s+(?=[^\s\"',;]*[0-9._~+/=-])[^\s\"',;]{8,}"
    r"|\b(?P<basic>Basic)\s+[A-Za-z0-9+/]{8,}={0,2}"
    r"|(?P<url>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s\"']+@"  # user:password@ in a URL
)
# Libraries that log every call at INFO: the request line and the metrics already say it.
_CHATTY = ("httpx", "httpcore", "hpack")
_MIN_SECRET_LENGTH = 4

_secrets: tuple[str, ...] = ()

#: A logging dictConfig for `uvicorn --log-config <file.json>` (write it out as JSON):
#: without it, the supervisor process of `--workers N`, which never imports the app,
#: logs its few lines (start, a worker died, stop) as plain text on stderr.
UVICORN_LOG_CONFIG: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"structured": {"()": "app.logging.formatter"}},
    "handlers": {
        _HANDLER_NAME: {
            "class": "logging.StreamHandler",
            "formatter": "structured",
            "stream": "ext://sys.stdout",
        }
    },
    "loggers": {
        "uvicorn": {"handlers": [_HANDLER_NAME], "level": "INFO", "propagate": False},
        "uvicorn.access": {"handlers": [_HANDLER_NAME], "level": "WARNING", "propagate": False},
    },
}


def _redact_fields(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    for name in [name for name in event if _SECRET_FIELD.search(name)]:
        event[name] = _REDACTED
    return event


def _mask(text: str) -> str:
    text = _CREDENTIAL.sub(_mask_match, text)
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, _REDACTED)
    return text


def _mask_match(match: re.Match[str]) -> str:
    scheme = match.group("scheme") or match.group("anycase") or match.group("basic")
    if scheme:
        return f"{scheme} {_REDACTED}"
    return f"{match.group('url')}{_REDACTED}@"


def _scrub(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return _mask(value)
    if depth < 4 and isinstance(value, dict):
        return {key: _scrub(item, depth + 1) for key, item in value.items()}
    if depth < 4 and isinstance(value, list | tuple):
        return [_scrub(item, depth + 1) for item in value]
    return value


def _scrub_values(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    """The last step before rendering, so it sees formatted tracebacks and foreign messages."""
    for name, value in event.items():
        if isinstance(value, str | dict | list | tuple):
            event[name] = _scrub(value)
    return event


def _add_pid(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    # Tells the workers of one `uvicorn --workers N` apart.
    event["pid"] = os.getpid()
    return event


def _orjson_dumps(event: Any, **_: Any) -> str:
    return orjson.dumps(event, default=repr).decode()


def _use_colors() -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    return bool(os.environ.get("FORCE_COLOR")) or sys.stdout.isatty()


def _shared_processors(fmt: str) -> list[Processor]:
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_pid,
        _redact_fields,
    ]
    if fmt != "console":
        # The console renderer prints exceptions itself, with colours.
        shared.append(structlog.processors.format_exc_info)
    return shared


def formatter(fmt: str | None = None) -> logging.Formatter:
    """The stdlib formatter of this pipeline (`fmt`: "json" or "console", default `LOG_FORMAT`).

    Also usable from a logging dictConfig (`"()": "app.logging.formatter"`), which
    is how `uvicorn --log-config` puts the supervisor of `--workers N` through it.
    """
    fmt = (fmt or os.environ.get("LOG_FORMAT") or "json").lower()
    renderer: Processor
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=_use_colors())
    else:
        renderer = structlog.processors.JSONRenderer(serializer=_orjson_dumps)
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared_processors(fmt),
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _scrub_values,
            renderer,
        ],
    )


def configure_logging(
    level: str = "info", fmt: str = "json", secrets: Iterable[str | None] = ()
) -> None:
    """Set up structlog and route stdlib logging (uvicorn included) through it.

    `secrets` (tokens from the settings) are masked wherever they would appear.
    """
    global _secrets
    _secrets = tuple({s for s in secrets if s and len(s) >= _MIN_SECRET_LENGTH})
    numeric = logging.getLevelName(level.upper())
    structlog.configure(
        processors=[
            *_shared_processors(fmt),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter(fmt))
    handler.setLevel(numeric)  # records propagated from loggers with their own lower level too
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    # Replace only the handler this function installed before, so handlers that a host
    # process (or pytest's log capture) added keep working.
    root.handlers[:] = [h for h in root.handlers if h.get_name() != _HANDLER_NAME] + [handler]
    root.setLevel(numeric)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.setLevel(logging.NOTSET)  # LOG_LEVEL decides, not uvicorn's --log-level
        uvicorn_logger.propagate = True
    # The app logs one line per request itself; uvicorn's access line would repeat it.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    for name in _CHATTY:
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))
