"""structlog on top of stdlib logging: JSON lines in production, readable lines at a terminal.

The app's own events go through structlog; uvicorn's (and any library's)
stdlib records are rendered by the same processors, so every line of the
process has one format and carries the request id bound by the middleware.

Secrets never reach the output: fields named like a credential are replaced,
`Bearer`/`Basic` credentials and `user:password@` in URLs are masked in every
string, and the values given to `configure_logging(secrets=...)` are masked
wherever they appear, tracebacks included.

One line is written for every request, so it has a fast path (`HotLogger`):
the same JSON line, fields and masking, rendered without the structlog chain
and the stdlib machinery, and written after each event-loop iteration in
writes of at most `PIPE_BUF` bytes, always before any other line
(app.log_handler).
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import sys
import time
from collections.abc import Iterable
from typing import Any, Final

import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from app.log_handler import BatchingHandler

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
_LEVEL_NAMES: Final = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warning",
    logging.ERROR: "error",
    logging.CRITICAL: "critical",
}
# The fields the processors set on every line.
_OWN_FIELDS: Final = frozenset({"event", "logger", "level", "timestamp", "pid"})
# Values the fast path renders as they are: no text, so nothing to mask.
_PLAIN_TYPES: Final = frozenset({int, float, bool, type(None)})

_secrets: tuple[str, ...] = ()
# Timestamps carry no caller text: they need masking only if a configured secret
# could be part of one.
_secret_may_be_a_timestamp = False
_TIMESTAMP_CHARACTERS: Final = frozenset("0123456789-:.TZ")
# The handler `configure_logging` installed when its format is JSON (the fast path's
# output), else None: the console renderer keeps the structlog path.
_fast_handler: BatchingHandler | None = None

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
    # Every credential pattern needs whitespace or "://"; the only whitespace
    # `isprintable` accepts is " ". So most values (ids, paths) skip the regex.
    if " " in text or "://" in text or not text.isprintable():
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


def _format_name(fmt: str | None) -> str:
    return (fmt or os.environ.get("LOG_FORMAT") or "json").lower()


def formatter(fmt: str | None = None) -> logging.Formatter:
    """The stdlib formatter of this pipeline (`fmt`: "json" or "console", default `LOG_FORMAT`).

    Also usable from a logging dictConfig (`"()": "app.logging.formatter"`), which
    is how `uvicorn --log-config` puts the supervisor of `--workers N` through it.
    """
    fmt = _format_name(fmt)
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
    global _secrets, _secret_may_be_a_timestamp, _fast_handler
    fmt = _format_name(fmt)
    _secrets = tuple({s for s in secrets if s and len(s) >= _MIN_SECRET_LENGTH})
    _secret_may_be_a_timestamp = any(set(s) <= _TIMESTAMP_CHARACTERS for s in _secrets)
    _masked.clear()
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
    if _fast_handler is not None:
        _fast_handler.flush()  # its pending lines before anything the new handler writes
    handler = BatchingHandler(sys.stdout)
    handler.setFormatter(formatter(fmt))
    handler.setLevel(numeric)  # records propagated from loggers with their own lower level too
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    # Replace only the handler this function installed before, so handlers that a host
    # process (or pytest's log capture) added keep working.
    root.handlers[:] = [h for h in root.handlers if h.get_name() != _HANDLER_NAME] + [handler]
    root.setLevel(numeric)
    _fast_handler = handler if fmt != "console" else None
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.setLevel(logging.NOTSET)  # LOG_LEVEL decides, not uvicorn's --log-level
        uvicorn_logger.propagate = True
    # The app logs one line per request itself; uvicorn's access line would repeat it.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    for name in _CHATTY:
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))


class HotLogger:
    """A logger for one event logged on every request: the JSON line the structlog
    chain would write (same fields, order and masking), at a fraction of its cost.

    `log()` takes the fields dict over and adds to it. With the console format,
    before `configure_logging` or once its handler is gone from the root logger,
    it logs through structlog. Its lines reach only that handler (not, say, pytest's
    log capture). Lines with a traceback are for structlog's rendering: log them there.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._stdlib = logging.getLogger(name)
        self._structlog = structlog.get_logger(name)

    def log(self, level: int, event: str, fields: dict[str, Any]) -> None:
        handler = _fast_handler
        if handler is None or handler not in logging.root.handlers:
            # The console format, or logging configured by someone else since.
            self._structlog.log(level, event, **fields)
            return
        # The filters of the structlog path: the handler's level (which is also its bound
        # logger's, `configure_logging`) and the stdlib logger's.
        if level < handler.level or not self._stdlib.isEnabledFor(level):
            return
        try:
            line = self._render(level, event, fields)
        except Exception:
            # Something orjson refuses (a dict with int keys...): the slow path reports it. The
            # keys `_render` added are set again there, its masking changes nothing twice.
            rest = {k: v for k, v in fields.items() if k not in _OWN_FIELDS}
            self._structlog.log(level, event, **rest)
            return
        handler.add(line)

    def _render(self, level: int, event: str, line: dict[str, Any]) -> bytes:
        # What `_shared_processors` and `formatter` do, in their order, with the result
        # of each step on a given text or field name remembered.
        line["event"] = event
        for name, value in structlog.contextvars.get_contextvars().items():
            line.setdefault(name, value)
        for name, value in line.items():
            secret = _field_is_secret.get(name)
            if secret is None:
                secret = _remember_field(name)
            if secret:
                line[name] = _REDACTED
            elif type(value) is str:
                line[name] = _masked.get(value) or _remember_mask(value)
            elif type(value) not in _PLAIN_TYPES and isinstance(value, str | dict | list | tuple):
                line[name] = _scrub(value)
        line["logger"] = _masked.get(self.name) or _remember_mask(self.name)
        level_name = _LEVEL_NAMES[level]
        line["level"] = _masked.get(level_name) or _remember_mask(level_name)
        line["timestamp"] = _mask(_timestamp()) if _secret_may_be_a_timestamp else _timestamp()
        line["pid"] = os.getpid()
        return orjson.dumps(line, default=repr, option=orjson.OPT_APPEND_NEWLINE)


# Field names come from the code (a few dozen), texts repeat (paths, instances, events):
# what each step made of them is remembered, up to a bound.
_field_is_secret: dict[str, bool] = {}
_masked: dict[str, str] = {}
_MASKED_TEXTS = 1024
_MASKED_TEXT_LENGTH = 128


def _remember_field(name: str) -> bool:
    if len(_field_is_secret) >= _MASKED_TEXTS:
        _field_is_secret.clear()
    secret = _field_is_secret[name] = _SECRET_FIELD.search(name) is not None
    return secret


def _remember_mask(text: str) -> str:
    masked = _mask(text)
    if len(text) <= _MASKED_TEXT_LENGTH:
        if len(_masked) >= _MASKED_TEXTS:
            _masked.clear()  # unique texts (request ids) must not grow it
        _masked[text] = masked
    return masked


_stamp_second: tuple[int, str] = (-1, "")


def _timestamp() -> str:
    """`TimeStamper(fmt="iso", utc=True)`'s text (`datetime.now(UTC).isoformat()`, "Z"
    for "+00:00"), with the date and time formatted once a second."""
    global _stamp_second
    second, micros = divmod(time.time_ns() // 1000, 1_000_000)  # datetime.now floors too
    cached, prefix = _stamp_second
    if second != cached:
        prefix = datetime.datetime.fromtimestamp(second, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _stamp_second = (second, prefix)
    # isoformat() leaves the fraction out when it is zero.
    return f"{prefix}.{micros:06d}Z" if micros else f"{prefix}Z"
