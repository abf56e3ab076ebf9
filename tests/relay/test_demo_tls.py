"""``relay demo --tls``: wss:// and https:// from a CA made for the run, trusted only when told."""

from __future__ import annotations

import re
import signal
import ssl
import stat
import subprocess
import sys
from functools import partial
from pathlib import Path

import httpx
import orjson
import pytest
import trio

from relay.server.demo import run_demo
from relay.server.localca import make_local_tls

from .harness import connect

TIMEOUT = 20


def trusting(ca_file: Path) -> ssl.SSLContext:
    """What a client does with the demo's CA line: trust that file (and only it, here)."""
    return ssl.create_default_context(cafile=str(ca_file))


async def test_the_tls_demo_serves_wss_and_https_that_its_ca_vouches_for() -> None:
    stop = trio.Event()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            demo = await nursery.start(
                partial(run_demo, "127.0.0.1", 0, tls=True, shutdown_trigger=stop.wait)
            )
            assert demo.relay_url.startswith("wss://127.0.0.1:")
            assert demo.ca_file is not None
            directory = demo.ca_file.parent
            assert stat.S_IMODE(directory.stat().st_mode) == 0o700
            assert stat.S_IMODE((directory / "key.pem").stat().st_mode) == 0o600

            async with connect(demo.relay_url + "/voice", ssl_context=trusting(demo.ca_file)) as ws:
                assert orjson.loads(await ws.get_message())["type"] == "session.created"
            for host in ("127.0.0.1", "localhost"):
                url = demo.relay_url.replace("wss://127.0.0.1", f"https://{host}") + "/"
                async with httpx.AsyncClient(verify=trusting(demo.ca_file)) as http:
                    page = await http.get(url)
                assert page.status_code == 200 and "<html" in page.text.lower()

            # A client that was not told to trust the CA refuses the relay.
            port = int(demo.relay_url.rsplit(":", 1)[1])
            stream = trio.SSLStream(
                await trio.open_tcp_stream("127.0.0.1", port),
                ssl.create_default_context(),
                server_hostname="127.0.0.1",
            )
            with pytest.raises(trio.BrokenResourceError) as refused:
                await stream.do_handshake()
            assert isinstance(refused.value.__cause__, ssl.SSLCertVerificationError)
            await trio.aclose_forcefully(stream)
            stop.set()
    assert not directory.exists(), "the demo leaves its CA and key behind"


def test_the_local_ca_certifies_the_loopback_names_and_keeps_no_ca_key(tmp_path: Path) -> None:
    from cryptography import x509

    tls = make_local_tls(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.pem", "cert.pem", "key.pem"]
    assert "PRIVATE KEY" not in tls.ca_file.read_text() + tls.cert_file.read_text()
    cert = x509.load_pem_x509_certificate(tls.cert_file.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(n) for n in names.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    ca = x509.load_pem_x509_certificate(tls.ca_file.read_bytes())
    cert.verify_directly_issued_by(ca)


def test_relay_demo_tls_prints_the_lines_that_make_node_and_python_trust_it() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "demo", "--tls", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        out = ""
        for _ in range(20):
            out += proc.stdout.readline()
            if "Ctrl-C" in out:
                break
        url = re.search(r"relay on (wss://127\.0\.0\.1:\d+)/voice", out)
        node = re.search(r"export NODE_EXTRA_CA_CERTS=(\S+)", out)
        python = re.search(r"export SSL_CERT_FILE=(\S+)", out)
        page = re.search(r"open https://127\.0\.0\.1:\d+/ in a browser", out)
        assert url and node and python and page, out
        ca_file = Path(node.group(1))
        assert python.group(1) == str(ca_file) and ca_file.is_file()

        async def one_session() -> str:
            async with connect(url.group(1) + "/voice", ssl_context=trusting(ca_file)) as ws:
                return orjson.loads(await ws.get_message())["type"]

        assert trio.run(one_session) == "session.created"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
        assert not ca_file.parent.exists()
    finally:
        proc.kill()
        proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe:
                pipe.close()
