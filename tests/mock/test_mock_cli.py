"""The ``mockrealtime`` command: argument handling and a real serve/stop cycle."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import trio

from mockrealtime.cli import build_parser, main

from .helpers import connect


def test_fault_flags_are_validated_with_a_clear_message(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", "--close-after-open", "1006:nope"])
    assert info.value.code == 2
    assert "cannot be sent in a close frame" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--close-after-open", "bye"])
    assert "expected CODE:REASON" in capsys.readouterr().err


def test_parser_collects_repeated_api_keys() -> None:
    args = build_parser().parse_args(["serve", "--api-key", "a", "--api-key", "b", "--pace", "0"])
    assert args.api_key == ["a", "b"] and args.pace == 0.0


async def test_serve_prints_its_url_and_stops_cleanly_on_sigterm() -> None:
    command = [
        sys.executable,
        "-c",
        "import sys; from mockrealtime.cli import main; sys.exit(main())",
        "serve",
        "--port",
        "0",
        "--api-key",
        "k1",
        "--pace",
        "0",
    ]
    with trio.fail_after(20):
        process = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE)
        try:
            assert process.stdout is not None
            line = b""
            while not line.endswith(b"\n"):
                chunk = await process.stdout.receive_some(1)
                assert chunk, "the server exited before printing its URL"
                line += chunk
            text = line.decode()
            assert text.startswith("mockrealtime listening on ws://127.0.0.1:")
            url = text.split()[3]
            async with connect(
                f"{url}?model=gpt-realtime", extra_headers=[(b"authorization", b"Bearer k1")]
            ) as ws:
                assert json.loads(await ws.get_message())["type"] == "session.created"
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0
            rest = b""
            while chunk := await process.stdout.receive_some(1024):
                rest += chunk
            assert b"mockrealtime stopped" in rest
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            if process.stdout is not None:
                await process.stdout.aclose()


def test_python_dash_m_runs_the_same_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mockrealtime", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "--port" in done.stdout and "--reject-beta" in done.stdout
