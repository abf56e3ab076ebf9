"""Log lines as an operator's pipeline reads them: JSON objects or text, never a secret."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from datetime import datetime

import orjson
import pytest

from relay.ops.logs import RelayLogHandler, configure_logging

UPSTREAM_KEY = "sk-upstream-logtest-5f2b8d"
JWT_SECRET = 'jwt"with\\quote-and-backslash-0123456789abcdef'
ADMIN_TOKEN = "admin-logtest-token-9e1c"
SECRETS = (UPSTREAM_KEY, JWT_SECRET, ADMIN_TOKEN)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    """Each test leaves the root logger as it found it (the suite's scanner stays)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def json_lines(stream: io.StringIO) -> list[dict]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


@pytest.mark.parametrize("name", ["relay", "mockrealtime", "hypercorn.error"])
def test_json_lines_carry_time_level_logger_message_and_fields(name: str) -> None:
    stream = io.StringIO()
    configure_logging("json", stream=stream)
    logging.getLogger(name).warning(
        "session %s ended", "s1", extra={"fields": {"user": "alice", "client_code": 1000}}
    )

    [entry] = json_lines(stream)
    assert entry["level"] == "warning"
    assert entry["logger"] == name
    assert entry["msg"] == "session s1 ended"
    assert entry["user"] == "alice"
    assert entry["client_code"] == 1000
    assert entry["ts"].endswith("Z")
    assert datetime.fromisoformat(entry["ts"]).utcoffset().total_seconds() == 0


def test_fields_cannot_replace_the_standard_keys() -> None:
    stream = io.StringIO()
    configure_logging("json", stream=stream)
    logging.getLogger("relay").info("real", extra={"fields": {"msg": "fake", "level": "x", "n": 1}})
    [entry] = json_lines(stream)
    assert (entry["msg"], entry["level"], entry["n"]) == ("real", "info", 1)


def test_an_exception_goes_into_exc_on_the_same_line() -> None:
    stream = io.StringIO()
    configure_logging("json", stream=stream)
    try:
        raise RuntimeError("upstream broke\non two lines")
    except RuntimeError:
        logging.getLogger("relay").exception("pair crashed")
    assert len(stream.getvalue().splitlines()) == 1
    [entry] = json_lines(stream)
    assert entry["msg"] == "pair crashed"
    assert entry["level"] == "error"
    assert "Traceback" in entry["exc"]
    assert "RuntimeError: upstream broke\non two lines" in entry["exc"]


class Peer:
    def __str__(self) -> str:
        return "peer 127.0.0.1"


def test_values_json_cannot_encode_are_written_as_text() -> None:
    stream = io.StringIO()
    configure_logging("json", stream=stream)
    logging.getLogger("relay").info("odd", extra={"fields": {"peer": Peer()}})
    [entry] = json_lines(stream)
    assert entry["peer"] == "peer 127.0.0.1"


@pytest.mark.parametrize("format", ["json", "text"])
def test_secrets_are_redacted_in_messages_args_fields_and_exceptions(format: str) -> None:
    stream = io.StringIO()
    configure_logging(format, secrets=SECRETS, stream=stream)
    log = logging.getLogger("relay")
    log.info(f"key in the message {UPSTREAM_KEY}")
    log.info("key in the args %s and %r", ADMIN_TOKEN, JWT_SECRET)
    log.info("key in a field", extra={"fields": {"auth": f"Bearer {UPSTREAM_KEY}"}})
    try:
        raise ValueError(f"the upstream refused {UPSTREAM_KEY} and {JWT_SECRET}")
    except ValueError:
        log.exception("refused")

    output = stream.getvalue()
    assert output.count("[redacted]") == 6
    for secret in SECRETS:
        assert secret not in output
        assert orjson.dumps(secret).decode()[1:-1] not in output  # nor its JSON spelling
        assert repr(secret)[1:-1] not in output  # nor its repr
    assert "ValueError: the upstream refused [redacted] and [redacted]" in output.replace(
        "\\n", "\n"
    )


def test_no_secret_redacts_nothing() -> None:
    stream = io.StringIO()
    configure_logging("text", secrets=("",), stream=stream)
    logging.getLogger("relay").info("plain words")
    assert stream.getvalue().rstrip().endswith("relay: plain words")


def test_auto_writes_text_to_a_terminal_and_json_elsewhere() -> None:
    terminal, pipe = Terminal(), io.StringIO()
    configure_logging("auto", stream=terminal)
    logging.getLogger("relay").info("to a person", extra={"fields": {"user": "alice"}})
    configure_logging("auto", stream=pipe)
    logging.getLogger("relay").info("to a machine")

    line = terminal.getvalue().rstrip("\n")
    assert not line.startswith("{")
    assert line.endswith("INFO    relay: to a person user=alice")
    datetime.fromisoformat(line.split(" ", 1)[0])
    assert json_lines(pipe)[0]["msg"] == "to a machine"


def test_text_mode_puts_the_traceback_after_the_line() -> None:
    stream = Terminal()
    configure_logging("auto", stream=stream)
    try:
        raise KeyError("missing")
    except KeyError:
        logging.getLogger("relay").exception("lookup failed")
    first, *rest = stream.getvalue().splitlines()
    assert first.endswith("ERROR   relay: lookup failed")
    assert rest[0].startswith("Traceback") and rest[-1] == "KeyError: 'missing'"


def test_configuring_twice_keeps_one_handler_and_leaves_others_alone() -> None:
    other = logging.NullHandler()
    logging.getLogger().addHandler(other)
    first, second = io.StringIO(), io.StringIO()
    configure_logging("json", stream=first)
    configure_logging("json", stream=second)
    logging.getLogger("relay").info("once")

    ours = [h for h in logging.getLogger().handlers if isinstance(h, RelayLogHandler)]
    assert len(ours) == 1
    assert other in logging.getLogger().handlers
    assert first.getvalue() == ""
    assert [e["msg"] for e in json_lines(second)] == ["once"]


def test_the_level_filters_records() -> None:
    stream = io.StringIO()
    configure_logging("json", level="warning", stream=stream)
    logging.getLogger("relay").info("quiet")
    logging.getLogger("relay").warning("loud")
    assert [e["msg"] for e in json_lines(stream)] == ["loud"]


@pytest.mark.parametrize("bad", [{"format": "xml"}, {"level": "chatty"}])
def test_a_bad_format_or_level_is_refused(bad: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="must be one of"):
        configure_logging(**bad, stream=io.StringIO())
