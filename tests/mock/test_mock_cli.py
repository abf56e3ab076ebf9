"""The ``mockrealtime`` command: argument handling and a real serve/stop cycle."""

from __future__ import annotations

import json
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio
import trustme

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


@asynccontextmanager
async def running_cli(*args: str) -> AsyncIterator[tuple[trio.Process, str]]:
    """``mockrealtime serve --port 0 ARGS`` in a subprocess, with the line it prints first."""
    command = [
        sys.executable,
        "-c",
        "import sys; from mockrealtime.cli import main; sys.exit(main())",
        "serve",
        "--port",
        "0",
        *args,
    ]
    process = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        line = b""
        while not line.endswith(b"\n"):
            chunk = await process.stdout.receive_some(1)
            assert chunk, "the server exited before printing its URL"
            line += chunk
        yield process, line.decode()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        if process.stdout is not None:
            await process.stdout.aclose()


async def test_serve_prints_its_url_and_stops_cleanly_on_sigterm() -> None:
    with trio.fail_after(20):
        async with running_cli("--api-key", "k1", "--pace", "0") as (process, text):
            assert text.startswith("mockrealtime listening on ws://127.0.0.1:")
            url = text.split()[3]
            async with connect(
                f"{url}?model=gpt-realtime", extra_headers=[(b"authorization", b"Bearer k1")]
            ) as ws:
                assert json.loads(await ws.get_message())["type"] == "session.created"
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0
            assert process.stdout is not None
            rest = b""
            while chunk := await process.stdout.receive_some(1024):
                rest += chunk
            assert b"mockrealtime stopped" in rest


def sdk_turn_over_tls(http_url: str, context: ssl.SSLContext) -> tuple[str, str]:
    """The openai SDK, unchanged, mints a client secret over https and talks over wss."""
    with httpx.Client(verify=context) as http:
        client = openai.OpenAI(
            api_key="k1", base_url=f"{http_url}/v1", http_client=http, max_retries=0, timeout=5
        )
        secret = client.realtime.client_secrets.create(session={"type": "realtime"})
        minted = client.with_options(api_key=secret.value)
        options: Any = {"ssl": context, "open_timeout": 5}
        with minted.realtime.connect(
            model="gpt-realtime-2", websocket_connection_options=options
        ) as conn:
            first = conn.recv().type
            conn.conversation.item.create(
                item={
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "Hi"}],
                }
            )
            conn.response.create(response={"output_modalities": ["text"]})
            while (event := conn.recv()).type != "response.done":
                pass
            return first, event.response.status or ""


async def test_serve_with_a_certificate_serves_wss_and_https(tmp_path: Path) -> None:
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    args = ("--api-key", "k1", "--pace", "0", "--tls-cert", str(cert), "--tls-key", str(key))
    with trio.fail_after(20):
        async with running_cli(*args) as (process, text):
            assert text.startswith("mockrealtime listening on wss://127.0.0.1:")
            http_url = text.split()[-1].rstrip(")\n")
            assert http_url.startswith("https://127.0.0.1:")
            result = await trio.to_thread.run_sync(sdk_turn_over_tls, http_url, client_context)
            assert result == ("session.created", "completed")
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0


def test_tls_flags_go_together_and_must_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--tls-cert", "cert.pem"])
    assert "--tls-cert and --tls-key go together" in capsys.readouterr().err
    missing = str(tmp_path / "missing.pem")
    with pytest.raises(SystemExit):
        main(["serve", "--tls-cert", missing, "--tls-key", missing])
    assert "cannot load the TLS certificate or key" in capsys.readouterr().err


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
