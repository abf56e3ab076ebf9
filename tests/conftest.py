"""Test-wide set-up: Hypothesis profiles, a printed replay seed, and a wsproto fix for test clients."""

from __future__ import annotations

import logging
import os
import random
import re
import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings
from wsproto import frame_protocol

# `ci` (the default) keeps the whole suite within a few minutes on 2 cores;
# `thorough` is for long runs: HYPOTHESIS_PROFILE=thorough uv run pytest tests/relay/test_properties.py
settings.register_profile(
    "ci",
    max_examples=100,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough",
    max_examples=25_000,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


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
)
SECRET_PATTERNS = (re.compile(r"sk-demo-[A-Za-z0-9_-]{16}"),)  # relay demo's per-run key


class SecretScanner(logging.Handler):
    """Sees every log record of the run (at INFO and above) and remembers any that holds a secret."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.leaks: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += logging.Formatter().formatException(record.exc_info)
        if any(secret in text for secret in SECRETS) or any(p.search(text) for p in SECRET_PATTERNS):
            self.leaks.append(f"{record.name}: {text[:300]}")


SCANNER = SecretScanner()


@pytest.fixture(autouse=True)
def no_secret_in_any_log_line() -> Iterator[None]:
    """Fail the test during which a log line carried a credential."""
    seen = len(SCANNER.leaks)
    yield
    assert SCANNER.leaks[seen:] == [], "a log line carried a secret"


def pytest_configure(config: pytest.Config) -> None:
    logging.getLogger().addHandler(SCANNER)
    if logging.getLogger().level > logging.INFO or logging.getLogger().level == logging.NOTSET:
        logging.getLogger().setLevel(logging.INFO)
    """Pick the run's Hypothesis seed up front so a failure can be replayed exactly."""
    if getattr(config.option, "hypothesis_seed", None) is None:
        seed = os.environ.get("HYPOTHESIS_SEED") or str(random.randrange(2**32))
        config.option.hypothesis_seed = int(seed)


def pytest_report_header(config: pytest.Config) -> str:
    seed = config.option.hypothesis_seed
    profile = os.environ.get("HYPOTHESIS_PROFILE", "ci")
    return f"hypothesis: profile {profile}, seed {seed} (replay with HYPOTHESIS_SEED={seed})"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    if terminalreporter.stats.get("failed"):
        seed = config.option.hypothesis_seed
        terminalreporter.write_line(f"hypothesis seed was {seed}: replay with HYPOTHESIS_SEED={seed}")

_process_close = frame_protocol.FrameProtocol._process_close


def _accept_1014(self: frame_protocol.FrameProtocol, frame: frame_protocol.Frame) -> frame_protocol.Frame:
    """Let the wsproto-based test clients read close code 1014 (Bad Gateway).

    1014 is registered with IANA and accepted by browsers, Node's ws and Python's
    websockets, but wsproto 1.3 treats it as an unknown reserved code and answers
    with a protocol error, which would hide the code the relay really sent.
    """
    data = frame.payload
    if isinstance(data, bytes | bytearray) and len(data) >= 2 and struct.unpack("!H", data[:2])[0] == 1014:
        return frame_protocol.Frame(
            frame.opcode, (1014, bytes(data[2:]).decode()), frame.frame_finished, frame.message_finished
        )
    return _process_close(self, frame)


frame_protocol.FrameProtocol._process_close = _accept_1014  # type: ignore[method-assign]
