"""Mutual TLS and tenant-labelled metrics on a real ``deft serve --auth keys`` process.

Certificates are made here with ``cryptography`` (a CA, the server's certificate, clients signed by
the CA and one signed by a rogue CA). TLS verifies the certificate; ``--tls-client-tenants`` maps a
verified subject to a key, whose tenant the call then acts as, and whose revocation revokes it.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from deft_client import DeftClient, DeftError
from test_tenants import create_key, deft_keys

from deft_runtime.adapter import AdapterKind
from deft_runtime.formats import save_adapter
from deft_runtime.testing import random_adapter

pytestmark = pytest.mark.slow
SHAPES = {"mid_block.attentions.0.transformer_blocks.0.attn1.to_q": (64, 64)}


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Acme"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _issue(
    subject: str, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None, *, ca: bool = False
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer if issuer is not None else (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if subject == "localhost":
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()), key


def _write(
    folder: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    cert_path, key_path = folder / f"{stem}.crt", folder / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    folder = tmp_path_factory.mktemp("pki")
    ca_cert, ca_key = _issue("deft test CA", None, ca=True)
    rogue_cert, rogue_key = _issue("rogue CA", None, ca=True)
    files = {"ca": _write(folder, "ca", ca_cert, ca_key)}
    for stem, issuer in (
        ("server", "localhost"),
        ("alice", "alice"),
        ("bob", "bob"),
        ("mallory", "mallory"),
    ):
        cert, key = _issue(issuer, (ca_cert.subject, ca_key))
        files[stem] = _write(folder, stem, cert, key)
    cert, key = _issue("alice", (rogue_cert.subject, rogue_key))  # alice's name, the wrong signer
    files["forged"] = _write(folder, "forged", cert, key)
    return files


@pytest.fixture(scope="module")
def setup(server_factory, pki, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("mtls-data")
    keys = {name: create_key(data_dir, name) for name in ("alice", "bob", "carol")}
    ids = {name: secret.split("_")[1] for name, secret in keys.items()}
    subjects = tmp_path_factory.mktemp("mtls") / "subjects.json"
    # alice by her full subject, bob by common name only; mallory's certificate is valid but unmapped
    subjects.write_text(json.dumps({"CN=alice,O=Acme": ids["alice"], "CN=bob": ids["bob"]}))
    server = server_factory.start(
        "--auth", "keys", "--metrics-tenant-labels",
        "--tls-cert", str(pki["server"][0]), "--tls-key", str(pki["server"][1]),
        "--tls-client-ca", str(pki["ca"][0]), "--tls-client-tenants", str(subjects),
        data_dir=data_dir, wait=False,
    )  # fmt: skip
    with _client(server, pki, "alice") as c:
        c.wait_ready(120)
    return server, keys, ids


def _client(server, pki, who: str | None, token: str | None = None) -> DeftClient:
    cert, key = pki[who] if who else (None, None)
    return DeftClient(
        f"localhost:{server.port}",
        root_certificates=pki["ca"][0],
        client_certificate=cert,
        client_key=key,
        token=token,
        timeout=60,
    )


def _adapter(tmp_path: Path, seed: int) -> Path:
    path = tmp_path / f"a{seed}.deft.safetensors"
    save_adapter(random_adapter(AdapterKind.DEFT, SHAPES, rank=2, seed=seed), path)
    return path


def test_a_mapped_certificate_acts_as_its_keys_tenant(setup, pki, tmp_path):
    server, keys, _ = setup
    with _client(server, pki, "alice") as alice:
        alice.register_adapter("cat", _adapter(tmp_path, 1))
        assert [a.name for a in alice.list_adapters()] == ["cat"]
    with _client(server, pki, "bob") as bob:  # mapped by CN: bob's own, empty namespace
        assert bob.list_adapters() == []
    with _client(server, pki, "mallory", token=keys["alice"]) as keyed:  # a key wins over the certificate
        assert [a.name for a in keyed.list_adapters()] == ["cat"]
    with _client(server, pki, "alice", token=keys["carol"]) as carol:
        assert carol.list_adapters() == []


def test_unmapped_unsigned_or_missing_certificates_are_refused(setup, pki):
    server, _, _ = setup
    with _client(server, pki, "mallory") as mallory, pytest.raises(DeftError) as info:
        mallory.list_adapters()
    assert info.value.code is grpc.StatusCode.UNAUTHENTICATED
    assert "not mapped to a tenant" in info.value.message
    for who in ("forged", None):  # signed by another CA / no certificate: TLS never completes
        with _client(server, pki, who) as c, pytest.raises(DeftError) as info:
            c.list_adapters()
        assert info.value.code is grpc.StatusCode.UNAVAILABLE


def test_revoking_the_mapped_key_revokes_the_certificate(setup, pki):
    server, _, ids = setup
    with _client(server, pki, "bob") as bob:
        assert bob.list_adapters() == []
        deft_keys(server.data_dir, "revoke", ids["bob"])
        time.sleep(1.2)  # the server's cache holds a verdict for at most a second
        with pytest.raises(DeftError) as info:
            bob.list_adapters()
    assert info.value.code is grpc.StatusCode.UNAUTHENTICATED


def test_request_metrics_carry_the_tenant_only_with_the_flag(setup, pki):
    server, _, _ = setup
    with _client(server, pki, "alice") as alice:
        alice.generate("a red circle", steps=1, seed=1)
    text = urllib.request.urlopen(server.metrics_url, timeout=30).read().decode()
    assert 'deft_requests_total{status="ok",tenant="alice"} 1.0' in text
    assert "cat" not in text  # adapter names are never label values


def test_client_certificates_need_tls_and_a_readable_map(server_factory, pki, tmp_path):
    broken = tmp_path / "subjects.json"
    broken.write_text('["CN=alice"]')
    server = server_factory.start(
        "--auth", "keys",
        "--tls-cert", str(pki["server"][0]), "--tls-key", str(pki["server"][1]),
        "--tls-client-ca", str(pki["ca"][0]), "--tls-client-tenants", str(broken), wait=False,
    )  # fmt: skip
    assert server.wait(120) != 0
    assert "must be a JSON object of subject to key id" in server.log()
    assert "Traceback" not in server.log()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"tls_client_ca": "ca.pem"}, "--tls-client-ca needs TLS"),
        (
            {"tls_cert": "c", "tls_key": "k", "tls_client_ca": "ca", "tls_client_tenants": "m.json"},
            "--tls-client-tenants goes with --auth keys",
        ),
        (
            {"tls_cert": "c", "tls_key": "k", "auth": "keys", "tls_client_tenants": "m.json"},
            "--tls-client-ca",
        ),
    ],
)
def test_mutual_tls_settings_are_checked(flags, message):
    from deft_server.config import ServerSettings
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        ServerSettings(**flags)
