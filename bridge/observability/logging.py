"""structlog set-up: JSON lines off a TTY, console on a TTY, stdlib logs through the same chain.

Every line, whether it comes from structlog or from stdlib logging (aiohttp, asyncio), passes
through `redact` after exceptions and stacks have been rendered to text, so a secret inside a
traceback is caught like one inside a message.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any, TextIO

import orjson
import structlog
from aiohttp.http_exceptions import HttpProcessingError, InvalidURLError, LineTooLong
from aiohttp.web_protocol import RequestPayloadError
from structlog.typing import EventDict, Processor, WrappedLogger

from bridge.observability.redaction import clear_secrets, fingerprint, redact, redact_text, register_secret

__all__ = [
    "LEVELS",
    "clear_secrets",
    "configure_logging",
    "fingerprint",
    "redact",
    "redact_text",
    "register_secret",
    "reset_logging",
]

LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
FORMATS = ("auto", "json", "console")


class _OurHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler we install so reconfiguring replaces it and leaves others alone."""


def _json_default(obj: Any) -> str:
    return str(obj)


_HEAD_KEYS = ("timestamp", "level", "logger", "event")


def _render_json(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> str:
    # Fixed leading keys make lines scannable by eye and by `cut`.
    line = {k: event_dict.pop(k) for k in _HEAD_KEYS if k in event_dict}
    line.update(event_dict)
    return orjson.dumps(line, default=_json_default, option=orjson.OPT_NON_STR_KEYS).decode()


def _level_of(level: str) -> int:
    try:
        return LEVELS[level.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}; got {level!r}") from None


def configure_logging(level: str = "info", fmt: str = "auto", *, stream: TextIO | None = None) -> None:
    """Configure structlog and stdlib logging for the process.

    level: debug | info | warning | error | critical.
    fmt: json, console, or auto (console when `stream` is a TTY, JSON lines otherwise).
    stream: where lines go (default: stdout); tests pass a StringIO.
    May be called again; the previous configuration is replaced."""
    threshold = _level_of(level)
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    out = stream if stream is not None else sys.stdout
    console = fmt == "console" or (fmt == "auto" and _isatty(out))

    renderer: Processor
    if console:
        renderer = structlog.dev.ConsoleRenderer(colors=_isatty(out), exception_formatter=structlog.dev.plain_traceback)
    else:
        renderer = _render_json
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # Exceptions and stacks become text first so redaction sees them; only then render.
    tail: list[Processor] = [
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        redact,
    ]

    structlog.configure(
        processors=[*shared, *tail, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        # Not cached: module-level loggers must follow a later reconfiguration (tests, reloads).
        # A filtered-out call still costs only ~2 µs.
        cache_logger_on_first_use=False,
    )

    handler = _OurHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            # The fields _ClientFaultFilter sets, so its line's event is a name to filter on.
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name, structlog.stdlib.ExtraAdder(_FAULT_FIELDS)],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail, renderer],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _OurHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(threshold)
    # aiohttp's access log would be one line per request; the app counts requests in metrics instead.
    logging.getLogger("aiohttp.access").setLevel(max(threshold, logging.WARNING))
    _remove_client_fault_filter()
    logging.getLogger("aiohttp.server").addFilter(_ClientFaultFilter(threshold))


def _remove_client_fault_filter() -> None:
    server = logging.getLogger("aiohttp.server")
    for old in [f for f in server.filters if isinstance(f, _ClientFaultFilter)]:
        server.removeFilter(old)


# The fields of a `bad_http_request` line, beside its event name.
_FAULT_FIELDS = ("status", "reason")


class _ClientFaultFilter(logging.Filter):
    """aiohttp logs a request it cannot parse (malformed HTTP, oversized headers, a
    Content-Encoding it cannot decode) as an ERROR with a traceback, and so a body that
    fails to inflate while it drains a request we already answered. That is the client's
    fault, not ours: one info line like any other rejected request, so anyone on the
    network cannot fill the error log or page an operator."""

    def __init__(self, threshold: int) -> None:
        super().__init__()
        self.threshold = threshold

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError | RequestPayloadError):
            return True
        status = getattr(exc, "code", 400)
        if isinstance(exc, RequestPayloadError) and isinstance(exc.__cause__, HttpProcessingError):
            # aiohttp wraps a body's fault as the str() of its error, "400, message:" on a
            # line of its own: the reason is the error's message.
            exc = exc.__cause__
        text = str(exc.message if isinstance(exc, HttpProcessingError) else exc)
        record.msg, record.args = "bad_http_request", ()
        record.status = status
        record.reason = client_fault_reason(exc, text)
        record.exc_info = record.exc_text = None
        if record.levelno < logging.WARNING:
            # A bad method on a connection's first request (a scanner, TLS sent to the
            # plain port) aiohttp logs at debug on purpose; its traceback quoted the
            # request line, query string and all, as the others quote theirs.
            return True
        record.levelno, record.levelname = logging.INFO, "INFO"
        return self.threshold <= logging.INFO


# A Python repr of text or bytes (b'...', '...', "...", bytearray(b'...')), as aiohttp quotes
# what it choked on.
_QUOTED = re.compile(r"(bytearray\()?(?:b?'(?:[^'\\]|\\.)*'|b?\"(?:[^\"\\]|\\.)*\")(?(1)\))")


def client_fault_reason(exc: BaseException, text: str) -> str:
    """What a ``bad_http_request`` line says: the first line of aiohttp's reason without the
    bytes it quotes. aiohttp quotes up to 100 bytes of the line it refused, which may be a
    credential (a write key the bridge does not know, so redaction cannot find it) or a
    query string's secret. It names no header: with aiohttp's C parser (the one its wheels
    run) the bytes of an oversized or invalid header are its value alone, whose text before
    a colon (``https`` of a URL, the id of an ``id:secret`` key) is no header's name."""
    reason = (text.strip().splitlines() or [""])[0]
    if isinstance(exc, InvalidURLError) and "\n" not in text.strip():
        # A request target yarl refused (a port past 65535, an empty host) is the whole of
        # the message, unquoted: its query string too.
        return "Invalid URL"
    quoted = exc.args[0] if isinstance(exc, LineTooLong) and exc.args else None
    if isinstance(quoted, str):
        return reason[:200]  # aiohttp's own words ("Status line is too long"), no data
    return _QUOTED.sub("…", reason)[:200]


def reset_logging() -> None:
    """Undo `configure_logging`: structlog defaults, our stdlib handler removed (tests)."""
    structlog.reset_defaults()
    _remove_client_fault_filter()
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _OurHandler)]:
        root.removeHandler(old)
    root.setLevel(logging.WARNING)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
