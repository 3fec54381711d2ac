"""The pilot's certificates and site keys, checked against independent references.

References: cryptography's X.509 path validation (the CA signs the SuperLink
certificate, for the names given), a real TLS handshake through Python's ssl
module (what a site's connection does), Flower's own key loaders (what
`flwr supernode register` and `flower-supernode` accept), and ssh-keygen's
fingerprint where it is installed.
"""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import socket
import ssl
import stat
import subprocess
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification

from fedcl.pilot.cli import main
from fedcl.pilot.connection import Connection, SuperLinkAddress, check_reachable
from fedcl.pilot.errors import PilotError
from fedcl.pilot.pki import (
    PkiFiles,
    certificate_fingerprint,
    init_pki,
    load_site_public_key,
    make_site_keys,
    parse_hosts,
    public_key_fingerprint,
)

HOSTS = ["superlink.example.org", "10.0.0.5"]


@pytest.fixture
def pki(tmp_path: Path) -> PkiFiles:
    """A CA and a SuperLink certificate for HOSTS (plus the local names) in tmp_path/certs."""
    return init_pki(tmp_path / "certs", parse_hosts(",".join(HOSTS)))


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_ca_signs_the_superlink_certificate_for_every_name(pki: PkiFiles) -> None:
    ca, cert = load_cert(pki.ca_certificate), load_cert(pki.server_certificate)
    store = verification.Store([ca])
    names = [
        verification.DNSName("superlink.example.org"),
        verification.IPAddress(ipaddress.ip_address("10.0.0.5")),
        verification.DNSName("localhost"),
        verification.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    for name in names:
        chain = verification.PolicyBuilder().store(store).build_server_verifier(name).verify(cert, [])
        assert chain[-1] == ca  # the path ends at the pilot CA
    with pytest.raises(verification.VerificationError):  # a name not given is not covered
        verification.PolicyBuilder().store(store).build_server_verifier(verification.DNSName("other.org")).verify(
            cert, []
        )
    foreign = init_pki(pki.folder.parent / "other", parse_hosts("superlink.example.org"))
    with pytest.raises(verification.VerificationError):  # another CA does not vouch for it
        verification.PolicyBuilder().store(
            verification.Store([load_cert(foreign.ca_certificate)])
        ).build_server_verifier(verification.DNSName("superlink.example.org")).verify(cert, [])


def test_subject_alternative_names_are_the_hosts_given_plus_the_local_ones(pki: PkiFiles) -> None:
    san = load_cert(pki.server_certificate).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(san.get_values_for_type(x509.DNSName)) == ["localhost", "superlink.example.org"]
    assert sorted(str(ip) for ip in san.get_values_for_type(x509.IPAddress)) == ["10.0.0.5", "127.0.0.1"]
    ca = load_cert(pki.ca_certificate)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not load_cert(pki.server_certificate).extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    now = datetime.datetime.now(datetime.UTC)
    assert (
        load_cert(pki.server_certificate).not_valid_before_utc
        <= now
        <= load_cert(pki.server_certificate).not_valid_after_utc
    )


def test_private_keys_are_0600_certificates_0644_and_the_folder_0700(pki: PkiFiles, tmp_path: Path) -> None:
    assert mode(pki.ca_key) == 0o600 and mode(pki.server_key) == 0o600
    assert mode(pki.ca_certificate) == 0o644 and mode(pki.server_certificate) == 0o644
    assert mode(pki.folder) == 0o700
    keys = make_site_keys("hospital-a", tmp_path / "keys")
    assert mode(keys.private_key) == 0o600 and mode(keys.public_key) == 0o644
    assert [path.name for path in sorted(pki.folder.iterdir())] == [
        "ca.key",
        "ca.pem",
        "superlink.key",
        "superlink.pem",
    ]


def test_existing_files_are_never_overwritten_without_force(pki: PkiFiles, tmp_path: Path) -> None:
    before = {path: path.read_bytes() for path in pki.folder.iterdir()}
    with pytest.raises(PilotError, match="--force"):
        init_pki(pki.folder, parse_hosts("x.org"))
    assert {path: path.read_bytes() for path in pki.folder.iterdir()} == before
    keys = make_site_keys("hospital-a", tmp_path / "keys")
    key_bytes = keys.private_key.read_bytes()
    with pytest.raises(PilotError, match="--force"):
        make_site_keys("hospital-a", tmp_path / "keys")
    assert keys.private_key.read_bytes() == key_bytes
    init_pki(pki.folder, parse_hosts("x.org"), force=True)  # with --force: replaced, still 0600
    assert pki.ca_key.read_bytes() != before[pki.ca_key] and mode(pki.ca_key) == 0o600
    assert make_site_keys("hospital-a", tmp_path / "keys", force=True).private_key.read_bytes() != key_bytes


def test_the_command_refuses_with_a_message_naming_force(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["pki", "init", "--out", str(tmp_path / "c"), "--hosts", "superlink.example.org"]) == 0
    assert main(["pki", "init", "--out", str(tmp_path / "c"), "--hosts", "superlink.example.org"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "already exist" in error[0] and "--force" in error[0]
    assert main(["site", "keys", "hospital-a", "--out", str(tmp_path / "k")]) == 0
    assert main(["site", "keys", "hospital-a", "--out", str(tmp_path / "k")]) == 2
    assert "--force" in capsys.readouterr().err


def test_reuse_ca_issues_a_new_superlink_certificate_under_the_same_ca(pki: PkiFiles) -> None:
    ca_before = pki.ca_certificate.read_bytes()
    init_pki(pki.folder, parse_hosts("new-name.example.org"), force=True, reuse_ca=True)
    assert pki.ca_certificate.read_bytes() == ca_before
    load_cert(pki.server_certificate).verify_directly_issued_by(load_cert(pki.ca_certificate))
    assert "new-name.example.org" in str(load_cert(pki.server_certificate).extensions)


def test_site_key_is_what_flower_loads(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key  # what `flwr supernode register` runs
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    keys = make_site_keys("hospital-a", tmp_path / "keys")
    private = serialization.load_ssh_private_key(keys.private_key.read_bytes(), None)  # what flower-supernode runs
    assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP384R1)
    assert keys.private_key.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    public = load_site_public_key(keys.public_key)
    assert public == private.public_key()  # the .pub is the .key's public half
    assert try_load_public_key(keys.public_key) == public_key_to_bytes(private.public_key())  # what it registers
    assert keys.public_key.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert keys.public_key.read_text().rstrip().endswith(" hospital-a")


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen is not installed")
def test_fingerprint_matches_ssh_keygen(tmp_path: Path) -> None:
    keys = make_site_keys("hospital-a", tmp_path / "keys")
    done = subprocess.run(["ssh-keygen", "-l", "-f", str(keys.public_key)], capture_output=True, text=True, check=True)
    assert public_key_fingerprint(load_site_public_key(keys.public_key)) == done.stdout.split()[1]
    # ssh-keygen reads the private key too: the format is OpenSSH's own
    derived = subprocess.run(["ssh-keygen", "-y", "-f", str(keys.private_key)], capture_output=True, text=True)
    assert derived.returncode == 0 and derived.stdout.split()[:2] == keys.public_key.read_text().split()[:2]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_ca_fingerprint_matches_openssl(pki: PkiFiles) -> None:
    done = subprocess.run(
        ["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", str(pki.ca_certificate)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert certificate_fingerprint(pki.ca_certificate) == done.stdout.strip().split("=", 1)[1]


def test_keys_flower_refuses_are_refused_here(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    other = tmp_path / "ed25519.pub"
    other.write_bytes(
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    with pytest.raises(PilotError, match="ECDSA"):
        load_site_public_key(other)
    keys = make_site_keys("hospital-a", tmp_path / "keys")
    with pytest.raises(PilotError, match=r"\.pub"):  # the private key sent by mistake
        load_site_public_key(keys.private_key)


def test_hosts_are_checked_and_the_local_names_always_added() -> None:
    assert parse_hosts("SuperLink.Example.org, 10.0.0.5,10.0.0.5") == [
        "superlink.example.org",
        "10.0.0.5",
        "localhost",
        "127.0.0.1",
    ]
    assert parse_hosts("") == ["localhost", "127.0.0.1"]
    for bad in ("https://superlink.org", "bad_name!", "a..b"):
        with pytest.raises(PilotError, match="--hosts"):
            parse_hosts(bad)
    with pytest.raises(PilotError, match="site name"):
        make_site_keys("../escape", Path("/tmp"))


def serve_tls_once(pki: PkiFiles) -> tuple[int, threading.Thread]:
    """A TLS server with the SuperLink certificate on a free local port, accepting one connection."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server_certificate, pki.server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        with listener:
            listener.settimeout(10)
            try:
                conn, _ = listener.accept()
                with context.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except (OSError, ssl.SSLError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return port, thread


def test_a_tls_client_trusting_the_ca_accepts_the_superlink_and_one_trusting_another_refuses(
    pki: PkiFiles, tmp_path: Path
) -> None:
    port, thread = serve_tls_once(pki)
    check_reachable(Connection(SuperLinkAddress("127.0.0.1", port), pki.ca_certificate, insecure=False))
    thread.join(5)
    foreign = init_pki(tmp_path / "foreign", parse_hosts("localhost"))
    port, thread = serve_tls_once(pki)
    with pytest.raises(PilotError, match="not the pilot's"):
        check_reachable(Connection(SuperLinkAddress("127.0.0.1", port), foreign.ca_certificate, insecure=False))
    thread.join(5)
