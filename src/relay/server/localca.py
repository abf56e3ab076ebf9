"""A certificate authority made for one run of ``relay demo --tls``.

Some clients only speak ``wss://`` (the ``openai`` npm package rewrites every Realtime URL to
it), so trying them against the demo on one's own machine needs TLS that they trust. The demo
makes a CA and a certificate for this machine's loopback names at start, and the developer
points the client at the CA file (``NODE_EXTRA_CA_CERTS`` for Node, ``SSL_CERT_FILE`` for
Python). The CA's private key is never written anywhere and is gone once the server
certificate is signed, so trusting that file trusts this one certificate and nothing made later.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: The names the server certificate is valid for: every way to write this machine's loopback.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
#: Long enough for a demo left running, short enough not to matter if the CA file lingers.
VALIDITY = datetime.timedelta(days=30)


@dataclass(frozen=True)
class LocalTLS:
    """The files of a local CA and of the server certificate it signed."""

    ca_file: Path  # the CA certificate (PEM): what clients are told to trust
    cert_file: Path  # the server certificate (PEM)
    key_file: Path  # the server's private key (PEM), readable by its owner only


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(names: tuple[str, ...]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    """A CA's key signs certificates (and nothing else); a server's signs its handshakes."""
    return x509.KeyUsage(
        digital_signature=not signs_certificates,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def make_local_tls(directory: Path, names: tuple[str, ...] = LOOPBACK_NAMES) -> LocalTLS:
    """Make a CA and a server certificate for ``names`` in ``directory`` (which should be
    private to this user, as :func:`tempfile.mkdtemp` makes it)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("relay demo local CA"))
        .issuer_name(_name("relay demo local CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signs_certificates=True), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signs_certificates=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_san(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    tls = LocalTLS(directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
    tls.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    tls.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(tls.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key_pem)
    return tls


@asynccontextmanager
async def temporary_local_tls() -> AsyncIterator[LocalTLS]:
    """A fresh CA and server certificate in a private temporary directory, removed on exit.

    (Asynchronous only so that a server opens it in the same ``async with`` as its nursery.)"""
    directory = Path(tempfile.mkdtemp(prefix="relay-demo-tls-"))  # mode 0700
    try:
        yield make_local_tls(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
