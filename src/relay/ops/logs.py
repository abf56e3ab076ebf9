"""Log output of ``relay`` and ``mockrealtime``: JSON lines for machines, text for people.

One handler on the root logger formats every record, so the ``relay``,
``mockrealtime`` and ``hypercorn.error`` loggers (which all propagate) come out
the same way. ``json`` writes one object per line::

    {"ts":"2025-01-31T12:00:00.123Z","level":"info","logger":"relay","msg":"session ended",
     "user":"alice","cause":"client_closed"}

Structured fields travel in ``extra={"fields": {...}}``::

    log.info("session ended", extra={"fields": {"user": user, "cause": cause.value}})

They become top-level keys of the JSON object (``ts``, ``level``, ``logger``,
``msg``, ``exc`` and ``stack`` are reserved and win over a field of the same
name) and ``key=value`` pairs at the end of a text line.

Every configured secret (the upstream key, the JWT secret, the admin token) is
replaced with ``[redacted]`` in the finished line, exception text and arguments
included: a last line of defence, not a licence to log them. Audio payloads are
never logged; the relay does not pass them to a logger, and nothing here would
make them small enough to be worth reading.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson

REDACTED = "[redacted]"
FORMATS = ("auto", "json", "text")
LEVELS = ("debug", "info", "warning", "error", "critical")
#: JSON keys a record's ``fields`` cannot replace.
RESERVED = frozenset({"ts", "level", "logger", "msg", "exc", "stack"})


def _timestamp(record: logging.LogRecord) -> str:
    """ISO-8601 UTC with milliseconds and a ``Z``, the form log pipelines parse without help."""
    moment = datetime.fromtimestamp(record.created, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _fields(record: logging.LogRecord) -> Mapping[str, Any]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, Mapping) else {}


class _Formatter(logging.Formatter):
    """Puts the fields every line of the process carries (a worker's ``pid``) under the record's."""

    def __init__(self, common: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.common = dict(common or {})

    def fields(self, record: logging.LogRecord) -> Mapping[str, Any]:
        own = _fields(record)
        return {**self.common, **own} if self.common else own


class JsonFormatter(_Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in self.fields(record).items():
            if str(key) not in RESERVED:
                entry[str(key)] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(entry, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


class TextFormatter(_Formatter):
    """``ts LEVEL logger: msg key=value…`` with any traceback on the lines after."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        fields = self.fields(record)
        if fields:
            line += " " + " ".join(f"{key}={value}" for key, value in fields.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        elif record.exc_text:
            line += "\n" + record.exc_text
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


class Redactor(logging.Formatter):
    """Wraps a formatter and replaces every secret in what it produced.

    It works on the finished text, so secrets in arguments, fields and exception
    messages are all caught, and also their JSON-escaped and ``repr`` spellings
    (a secret with a quote or a backslash in it is written differently there).
    """

    def __init__(self, inner: logging.Formatter, secrets: Iterable[str]) -> None:
        super().__init__()
        self.inner = inner
        spellings: set[str] = set()
        for secret in secrets:
            if secret:
                for spelling in (secret, repr(secret)[1:-1]):
                    spellings.add(spelling)
                    spellings.add(orjson.dumps(spelling).decode()[1:-1])
        # Longest first, so a secret that contains another is replaced whole.
        self.secrets = tuple(sorted(spellings, key=len, reverse=True))

    def format(self, record: logging.LogRecord) -> str:
        text = self.inner.format(record)
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text


class RelayLogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler :func:`configure_logging` installs; its class marks it as ours."""


def configure_logging(
    format: str = "auto",
    level: str = "info",
    secrets: Iterable[str] = (),
    *,
    stream: TextIO | None = None,
    fields: Mapping[str, Any] | None = None,
) -> logging.Handler:
    """Send every log record to ``stream`` (stderr) as JSON lines or text, secrets redacted.

    ``auto`` picks text when the stream is a terminal, else JSON. Calling it again
    replaces the handler it installed before (new format, level or secrets) and
    leaves every other handler alone. ``fields`` go on every line (a record's own
    fields of the same name win): the worker processes of one relay, whose lines
    interleave, each add their ``pid``. Returns the installed handler.
    """
    if format not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {format!r}")
    if level.lower() not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}")
    stream = stream if stream is not None else sys.stderr
    if format == "auto":
        isatty = getattr(stream, "isatty", None)
        format = "text" if isatty is not None and isatty() else "json"
    inner: logging.Formatter = JsonFormatter(fields) if format == "json" else TextFormatter(fields)

    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, RelayLogHandler):
            root.removeHandler(handler)
            handler.close()
    handler = RelayLogHandler(stream)
    handler.setFormatter(Redactor(inner, secrets))
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler
