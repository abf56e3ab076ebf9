"""The suite's own leak checks: they flag the relay's upstream key, and only that, wherever it shows."""

from __future__ import annotations

import logging
import secrets

import pytest
import trio

from ..leaks import (
    CLIENT_LEAKS,
    UPSTREAM_KEYS,
    SecretScanner,
    check_client_sees_no_upstream_key,
    hold,
)
from .harness import TEST_KEY, closed_port_url, running_relay


def test_a_client_frame_with_the_upstream_key_fails_the_test() -> None:
    seen = len(CLIENT_LEAKS)
    with pytest.raises(AssertionError, match="upstream key sk-tes…"):
        check_client_sees_no_upstream_key("a message", f'{{"error":{{"message":"Bearer {TEST_KEY}"}}}}')
    assert TEST_KEY not in CLIENT_LEAKS[-1]  # the report masks the key it found
    del CLIENT_LEAKS[seen:]  # the leak was planted: it must not fail this test at its end


def test_a_key_made_up_for_one_relay_is_caught_once_a_relay_holds_it() -> None:
    key = "sk-made-up-for-this-test-31337"
    check_client_sees_no_upstream_key("a message", f"key {key}")  # nobody holds it yet: not a leak
    hold(key)
    seen = len(CLIENT_LEAKS)
    with pytest.raises(AssertionError):
        check_client_sees_no_upstream_key("the close reason", f"bad key {key}".encode())
    del CLIENT_LEAKS[seen:]


async def test_every_relay_a_test_starts_has_its_upstream_key_watched() -> None:
    key = "sk-only-this-relay-holds-" + secrets.token_hex(4)
    with trio.fail_after(10):
        async with running_relay(openai_api_key=key, upstream_url=closed_port_url()):
            pass
    assert key in UPSTREAM_KEYS


@pytest.mark.parametrize(
    "text",
    [
        "sk-the-sdk-users-own-key",  # a client's own credential, which it sent itself
        "Incorrect API key provided: sk-…6789.",  # the masked form the real API quotes
        "[redacted]",
    ],
)
def test_client_credentials_and_masked_keys_are_not_leaks(text: str) -> None:
    check_client_sees_no_upstream_key("a message", text)


def record(message: str, **fields: object) -> logging.LogRecord:
    made = logging.LogRecord("relay", logging.INFO, __file__, 1, message, None, None)
    if fields:
        made.fields = fields  # type: ignore[attr-defined]
    return made


def test_the_log_scanner_reads_structured_fields_as_well_as_the_message() -> None:
    scanner = SecretScanner()
    scanner.emit(record("session started", user="alice", auth=f"Bearer {TEST_KEY}"))
    scanner.emit(record(f"dialling with {TEST_KEY}"))
    scanner.emit(record("session started", user="alice", model="gpt-realtime"))
    scanner.emit(record("client sent", token="sk-the-sdk-users-own-key"))
    assert len(scanner.leaks) == 2
    assert not any(TEST_KEY in leak for leak in scanner.leaks)
