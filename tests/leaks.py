"""The secrets the suite hands out, and the checks that none leaks where it must not.

Two rules, checked for every test:

* no credential of any kind appears in a log line (message, arguments, exception or
  structured ``fields``);
* no upstream key, the one secret the relay holds for the OpenAI side, reaches a
  client: not in a frame, not in a close reason (nor anything sent to Twilio's side of a
  phone call, checked where the relay writes it: tests/conftest.py).

Upstream keys are not only a fixed list: every key a relay of this run is given
upstream is recorded (:func:`hold`, called when the relay builds its dialer or a
bridge), so keys a test makes up on the spot (``relay demo``'s ``sk-demo-…``) are
covered. Text is searched for ``sk-`` style keys and each one found is checked
against those held keys, so a key a test deliberately sends as a *client*
credential (``sk-the-sdk-users-own-key``), or a masked one an assertion quotes
(``sk-…6789``), is not taken for a leak.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

#: Every credential the suite hands to the relay or the fake; none may appear in a log line.
SECRETS = (
    "sk-test-upstream-secret-0123456789",  # the relay's upstream key in tests/relay
    "sk-memory-secret-7f3a9c",
    "jwt-shared-secret-for-tests-0123456789abcdef",
    "rk_alice_0123456789",
    "rk_alice_key",
    "rk_test_client_key_abcdef",
    "sk-test-0123456789",
    "sk-sdk-conformance",
    "relay-demo-twilio-auth-token",  # relay demo's (and relay call's) Twilio auth token
    "twilio-auth-token-for-tests-0123",
)
SECRET_PATTERNS = (
    re.compile(r"sk-demo-[A-Za-z0-9_-]{16}"),  # relay demo's per-run key
    re.compile(r"rst1\.[A-Za-z0-9_-]{20,}"),  # a phone call's stream token
)

#: An OpenAI-style key as it would appear in text.
SK_KEY = re.compile(r"sk-[A-Za-z0-9_-]+")
#: Shorter keys (``sk-x`` in config tests) are too short to tell from other text.
MIN_KEY_LENGTH = 8

#: The upstream keys relays of this run held (the fixed ones, and each one given to a relay).
UPSTREAM_KEYS: set[str] = {"sk-test-upstream-secret-0123456789", "sk-memory-secret-7f3a9c"}

#: Leaks seen by helpers that may run in a task whose exception a test swallows.
CLIENT_LEAKS: list[str] = []


def hold(key: str) -> None:
    """Record ``key`` as an upstream key a relay holds."""
    if len(key) >= MIN_KEY_LENGTH:
        UPSTREAM_KEYS.add(key)


def upstream_key_in(text: str) -> str | None:
    """The upstream key ``text`` carries, if any."""
    if "sk-" not in text:
        return None
    for match in SK_KEY.finditer(text):
        found = match.group()
        for key in UPSTREAM_KEYS:
            if found.startswith(key):
                return key
    return None


def secret_in_log_record(message: str, fields: object) -> str | None:
    """The secret a log record carries in its text or its structured fields, if any."""
    text = message
    if isinstance(fields, Mapping):
        text += " " + repr(dict(fields))
    for secret in SECRETS:
        if secret in text:
            return secret
    for pattern in SECRET_PATTERNS:
        if found := pattern.search(text):
            return found.group()
    return upstream_key_in(text)


def check_client_sees_no_upstream_key(
    what: str, data: str | bytes | None, *, fail_now: bool = True
) -> None:
    """Fail the test if ``data``, which a client received, holds an upstream key: at its end,
    and (``fail_now``) at once, with an AssertionError."""
    if not data:
        return
    text = data if isinstance(data, str) else data.decode("latin-1")
    key = upstream_key_in(text)
    if key is not None:
        masked = key[:6] + "…"
        leak = f"{what} carried the upstream key {masked}: {text[:200].replace(key, masked)!r}"
        CLIENT_LEAKS.append(leak)
        if fail_now:
            raise AssertionError(leak)


class SecretScanner(logging.Handler):
    """Sees every log record of the run (at INFO and above) and remembers any that holds a secret."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.leaks: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += logging.Formatter().formatException(record.exc_info)
        secret = secret_in_log_record(text, getattr(record, "fields", None))
        if secret is not None:
            self.leaks.append(f"{record.name}: {text[:300].replace(secret, secret[:6] + '…')}")
