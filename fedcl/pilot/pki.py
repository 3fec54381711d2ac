"""The pilot's keys and certificates: a CA, the SuperLink's TLS certificate, and each site's key pair.

What each file is and who keeps it:

``ca.pem``          the CA certificate. Public: every site gets a copy and passes it to
                    ``fedcl site start --root-cert``; it is how a site knows it talks to the real SuperLink.
``ca.key``          the CA's private key (0600). Signs SuperLink certificates; the coordinator keeps it
                    offline after ``pki init`` (it is needed again only to issue a new SuperLink certificate).
``superlink.pem``   the SuperLink's TLS certificate, signed by the CA, valid for the host names and
                    addresses given to ``pki init`` (plus localhost and 127.0.0.1: the SuperLink's own
                    ServerApp process connects back to it locally).
``superlink.key``   its private key (0600); stays on the SuperLink host.
``<site>.key``      a site's authentication key (ECDSA P-384, OpenSSH format, 0600): what
                    ``flower-supernode --auth-supernode-private-key`` loads. Never leaves the site.
``<site>.pub``      its public key (OpenSSH format, one line): what ``flwr supernode register`` loads.
                    The site sends it to the coordinator, who registers it with the SuperLink.

Flower 1.42 loads the site key with ``cryptography``'s ``load_ssh_private_key`` and the public key
with ``load_ssh_public_key``, and accepts NIST curves only: the same files ``ssh-keygen -t ecdsa -b 384``
writes.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedcl.pilot.errors import PilotError
from fedcl.pilot.secret_files import PRIVATE_MODE, PUBLIC_MODE, make_private_folder, refuse_existing, write_files

ALWAYS_HOSTS = ("localhost", "127.0.0.1")  # the SuperLink's own ServerApp connects back to it on 127.0.0.1
CURVE = ec.SECP384R1  # P-384: what Flower's docs generate with ssh-keygen -t ecdsa -b 384; a NIST curve Flower accepts
CA_DAYS = 1825  # five years: the CA outlives several SuperLink certificates
SERVER_DAYS = 365  # one year: renew with `fedcl pki init --reuse-ca --force`
CLOCK_SKEW = datetime.timedelta(minutes=5)  # certificates valid from a little before now: hosts' clocks differ
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


@dataclass(frozen=True)
class PkiFiles:
    """The coordinator's certificate folder: the CA and the SuperLink's certificate, each with its key."""

    folder: Path

    @property
    def ca_certificate(self) -> Path:
        """``ca.pem``: public, handed to every site."""
        return self.folder / "ca.pem"

    @property
    def ca_key(self) -> Path:
        """``ca.key``: the CA's private key, kept offline by the coordinator."""
        return self.folder / "ca.key"

    @property
    def server_certificate(self) -> Path:
        """``superlink.pem``: the SuperLink's TLS certificate."""
        return self.folder / "superlink.pem"

    @property
    def server_key(self) -> Path:
        """``superlink.key``: its private key, on the SuperLink host only."""
        return self.folder / "superlink.key"


@dataclass(frozen=True)
class SiteKeyFiles:
    """A site's authentication key pair."""

    private_key: Path
    public_key: Path


def check_site_name(name: str) -> str:
    """Return ``name`` if it can name a site (its key files and its SuperNode), else raise :class:`PilotError`."""
    if not SITE_NAME.match(name or ""):
        raise PilotError(
            f"site name {name!r}: use letters, digits, '.', '_' or '-' (up to 63, starting with a letter or digit), "
            "e.g. hospital-a"
        )
    return name


def parse_hosts(text: str) -> list[str]:
    """The SuperLink certificate's names: the comma-separated hosts given, then localhost and 127.0.0.1.

    Each entry is an IP address (v4 or v6) or a DNS name; duplicates are
    dropped, order kept. Raises :class:`PilotError` for an entry that is neither.
    """
    hosts: list[str] = []
    for raw in [part.strip() for part in text.split(",")] + list(ALWAYS_HOSTS):
        if not raw:
            continue
        try:
            host = str(ipaddress.ip_address(raw.strip("[]")))
        except ValueError:
            host = raw.lower().rstrip(".")
            if len(host) > 253 or not all(HOST_LABEL.match(label) for label in host.split(".")):
                raise PilotError(
                    f"--hosts entry {raw!r} is neither an IP address nor a host name; give the names and addresses "
                    "the sites will use to reach the SuperLink, e.g. --hosts superlink.hospital-net.org,10.0.0.5"
                ) from None
        if host not in hosts:
            hosts.append(host)
    return hosts


def subject_alternative_names(hosts: list[str]) -> list[x509.GeneralName]:
    """The SAN entries for ``hosts``: an IPAddress entry for an address, a DNSName entry for a name."""
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _ca_certificate(key: ec.EllipticCurvePrivateKey, days: int) -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedcl pilot"),
            x509.NameAttribute(NameOID.COMMON_NAME, "fedcl pilot CA"),
        ]
    )
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )


def _server_certificate(
    key: ec.EllipticCurvePrivateKey,
    hosts: list[str],
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    days: int,
) -> x509.Certificate:
    now = _now()
    not_after = min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc)
    return (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedcl pilot"),
                    x509.NameAttribute(NameOID.COMMON_NAME, hosts[0]),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(subject_alternative_names(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )


def load_ca(files: PkiFiles) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Load an existing CA (certificate and key) from ``files``; :class:`PilotError` if either is missing or bad."""
    for path in (files.ca_certificate, files.ca_key):
        if not path.is_file():
            raise PilotError(f"{path} is missing; --reuse-ca needs the ca.pem and ca.key that `fedcl pki init` made")
    try:
        cert = x509.load_pem_x509_certificate(files.ca_certificate.read_bytes())
        key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
    except ValueError as err:
        raise PilotError(
            f"{files.folder}: cannot read the CA ({err}); run `fedcl pki init` without --reuse-ca"
        ) from err
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise PilotError(f"{files.ca_key} does not belong to {files.ca_certificate}; restore the pair from your backup")
    return cert, key


def init_pki(
    folder: Path,
    hosts: list[str],
    force: bool = False,
    reuse_ca: bool = False,
    ca_days: int = CA_DAYS,
    server_days: int = SERVER_DAYS,
) -> PkiFiles:
    """Make the CA (or reuse the one in ``folder``) and a SuperLink certificate for ``hosts``.

    ``hosts`` are the certificate's names (see :func:`parse_hosts`; the first
    is its common name). Nothing is written if any target file exists and
    ``force`` is false (:class:`PilotError` names ``--force``). Private keys
    are written 0600, certificates 0644; a new folder is made 0700.
    """
    if not hosts:
        raise PilotError("no host names given; pass --hosts with the names or addresses sites use for the SuperLink")
    if ca_days < 1 or server_days < 1:
        raise PilotError("certificate lifetimes must be at least one day")
    files = PkiFiles(Path(folder))
    targets = [files.server_certificate, files.server_key]
    if not reuse_ca:
        targets = [files.ca_certificate, files.ca_key, *targets]
    refuse_existing(targets, force)
    make_private_folder(files.folder)
    if reuse_ca:
        ca_cert, ca_key = load_ca(files)
    else:
        ca_key = ec.generate_private_key(CURVE())
        ca_cert = _ca_certificate(ca_key, ca_days)
    server_key = ec.generate_private_key(CURVE())
    server_cert = _server_certificate(server_key, hosts, ca_cert, ca_key, server_days)
    outputs: dict[Path, tuple[bytes, int]] = {}
    if not reuse_ca:
        outputs[files.ca_key] = (_private_pem(ca_key), PRIVATE_MODE)
        outputs[files.ca_certificate] = (ca_cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE)
    outputs[files.server_key] = (_private_pem(server_key), PRIVATE_MODE)
    outputs[files.server_certificate] = (server_cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE)
    write_files(outputs, force)
    return files


def site_key_files(name: str, folder: Path) -> SiteKeyFiles:
    """Where ``make_site_keys`` writes site ``name``'s pair: ``<folder>/<name>.key`` and ``<folder>/<name>.pub``."""
    check_site_name(name)
    return SiteKeyFiles(Path(folder) / f"{name}.key", Path(folder) / f"{name}.pub")


def make_site_keys(name: str, folder: Path, force: bool = False) -> SiteKeyFiles:
    """Make site ``name``'s ECDSA P-384 key pair in OpenSSH format (private 0600, public 0644).

    The private key is what ``flower-supernode --auth-supernode-private-key``
    loads; the public key (one line, commented with the site's name) is what
    ``flwr supernode register`` loads. Refuses to overwrite without ``force``.
    """
    files = site_key_files(name, folder)
    refuse_existing([files.private_key, files.public_key], force)
    make_private_folder(Path(folder))
    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    write_files(
        {files.private_key: (private, PRIVATE_MODE), files.public_key: (public + f" {name}\n".encode(), PUBLIC_MODE)},
        force,
    )
    return files


def load_site_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """Load a site's public key file (OpenSSH format, NIST curve) as Flower's register command does.

    Raises :class:`PilotError` with the fix when the file is missing or is not
    such a key (e.g. an RSA or ed25519 key, or the private key by mistake).
    """
    path = Path(path)
    if not path.is_file():
        raise PilotError(f"public key {path} does not exist; the site makes it with `fedcl site keys NAME --out DIR`")
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise PilotError(
            f"{path} is not an OpenSSH public key ({err}); send the site's .pub file (never its .key), "
            "made by `fedcl site keys` or `ssh-keygen -t ecdsa -b 384`"
        ) from err
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(
        key.curve, (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
    ):
        raise PilotError(f"{path}: Flower accepts ECDSA keys on a NIST curve only; make one with `fedcl site keys`")
    return key


def load_site_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Load a site's private key as ``flower-supernode`` does; :class:`PilotError` with the fix if it cannot."""
    path = Path(path)
    if not path.is_file():
        raise PilotError(
            f"private key {path} does not exist; make the site's keys with `fedcl site keys NAME --out DIR`"
        )
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise PilotError(
            f"{path} is not an unencrypted OpenSSH private key ({err}); use the .key file `fedcl site keys` made"
        ) from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PilotError(f"{path}: Flower needs an ECDSA key (NIST curve); make one with `fedcl site keys`")
    return key


def public_key_fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """The key's SHA256 fingerprint as ``ssh-keygen -l`` prints it: compare it by phone before registering."""
    blob = base64.b64decode(
        key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).split()[1]
    )
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")


def certificate_fingerprint(path: Path) -> str:
    """A certificate's SHA-256 fingerprint as ``openssl x509 -noout -fingerprint -sha256`` prints it (AA:BB:...).

    A site compares the one of the ca.pem it received with the one the
    coordinator reads out: the CA is what a site trusts the SuperLink by.
    """
    cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    return ":".join(f"{byte:02X}" for byte in cert.fingerprint(hashes.SHA256()))


def certificate_names(path: Path) -> list[str]:
    """The DNS names and IP addresses a certificate (PEM) is valid for."""
    cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName), *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]
