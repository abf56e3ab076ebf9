"""Every private name of Trio and Hypercorn the relay relies on is where the relay expects it, in
the installed versions (relay.wire.internals): a lock bump that moves one fails here, naming it.
The relay checks the same table at start-up, and turns the fast path that needs the name off."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from relay.wire import internals
from relay.wire.internals import PUMP, TAKEOVER, Internal

TCP_SERVER = "hypercorn.trio.tcp_server:TCPServer"

ROOT = Path(__file__).parents[2]


@pytest.mark.parametrize("internal", internals.INTERNALS, ids=lambda i: f"{i.feature}:{i.where}")
def test_a_private_name_the_relay_relies_on_is_where_it_expects(
    internal: internals.Internal,
) -> None:
    problem = internals.check(internal)
    assert problem is None, (
        f"{problem}. The relay relies on it ({internal.why or internal.feature}); adapt"
        f" relay.wire.{internal.feature if internal.feature != 'serve' else 'takeover'} and the"
        " table in relay.wire.internals to the new version, or keep the old one."
    )


@pytest.mark.parametrize(
    "internal, problem",
    [
        (Internal(PUMP, "trio._core._run:Runner.gone", instance=True), "no attribute gone"),
        (Internal(PUMP, "trio._core._nowhere:X"), "no module trio._core._nowhere"),
        (Internal(TAKEOVER, "hypercorn.events:Gone"), "no Gone"),
        (
            Internal(TAKEOVER, f"{TCP_SERVER}._read_data", params=("self", "more")),
            "parameters ('self',), expected ('self', 'more')",
        ),
        (
            Internal(PUMP, "trio._core._run:run", calls="io_manager.wait_for("),
            "no longer contains 'io_manager.wait_for('",
        ),
    ],
    ids=["instance attribute", "module", "name", "signature", "call site"],
)
def test_a_name_that_moved_is_reported_with_where_and_how(
    internal: internals.Internal, problem: str
) -> None:
    found = internals.check(internal)
    assert found is not None and internal.where in found and problem in found


def test_trio_is_fenced_below_its_next_minor_version_and_hypercorn_is_pinned() -> None:
    """The table holds for the versions CI runs; pip must not install others."""
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    trio_spec = next(d for d in dependencies if d.startswith("trio>") or d.startswith("trio<"))
    hypercorn_spec = next(d for d in dependencies if d.startswith("hypercorn"))
    import trio

    major, minor = (int(part) for part in trio.__version__.split(".")[:2])
    assert f"<{major}.{minor + 1}" in trio_spec, trio_spec
    assert "==" in hypercorn_spec, hypercorn_spec
