"""Keepalive settings that would drop live sessions are refused at start-up."""

from __future__ import annotations

import pytest

from relay.config import ConfigError, load_config


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"RELAY_PING_INTERVAL": "30", "RELAY_PEER_TIMEOUT": "30"},
            r"RELAY_PEER_TIMEOUT \(30\) must be above RELAY_PING_INTERVAL \(30\)",
        ),
        (
            {"RELAY_PING_INTERVAL": "25", "RELAY_PEER_TIMEOUT": "20"},
            r"RELAY_PEER_TIMEOUT \(20\) must be above RELAY_PING_INTERVAL \(25\)",
        ),
        (
            {"RELAY_PING_INTERVAL": "60"},  # above the default peer timeout (45)
            r"RELAY_PEER_TIMEOUT \(45\) must be above RELAY_PING_INTERVAL \(60\)",
        ),
        (
            {"RELAY_PING_INTERVAL": "0"},  # the default peer timeout with no pings
            r"RELAY_PEER_TIMEOUT \(45\) needs pings: with RELAY_PING_INTERVAL=0",
        ),
        (
            {"RELAY_PING_INTERVAL": "0", "RELAY_PEER_TIMEOUT": "120"},
            r"quiet for 120 s would be dropped",
        ),
    ],
)
def test_a_peer_timeout_that_would_drop_quiet_sessions_is_refused(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(env)


def test_the_same_holds_for_command_line_values() -> None:
    with pytest.raises(ConfigError, match="must be above RELAY_PING_INTERVAL"):
        load_config({}, {"ping_interval": 50.0, "peer_timeout": 50.0})


@pytest.mark.parametrize(
    ("ping_interval", "peer_timeout"),
    [
        (20.0, 45.0),  # the defaults
        (0.2, 1.0),
        (20.0, 0.0),  # pings keep proxies open; nobody is reaped
        (0.0, 0.0),  # neither
    ],
)
def test_keepalive_settings_that_hear_from_quiet_peers_are_accepted(
    ping_interval: float, peer_timeout: float
) -> None:
    config = load_config(
        {}, {"ping_interval": ping_interval, "peer_timeout": peer_timeout, "send_timeout": 0.5}
    )
    assert (config.ping_interval, config.peer_timeout) == (ping_interval, peer_timeout)
