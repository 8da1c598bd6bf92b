"""Certificates and node keys for a real Flower deployment: one CA, one SuperLink TLS certificate, one key per site.

The coordinator's certificate folder DIR::

    DIR/ca/ca.crt, ca.key                 the federation's CA (ca.key stays with the coordinator, ideally offline)
    DIR/superlink/server.crt, server.key  the SuperLink's TLS certificate, signed by the CA
    DIR/sites/<name>/site.pub             the site's OpenSSH public key (what `flwr supernode register` takes)
    DIR/sites/<name>/site.key             only when the coordinator generated the pair for the site
    DIR/sites/<name>/ca.crt               a copy of the CA certificate: sites/<name>/ is the bundle for that hospital

A hospital that makes its own key pair (``site_key_pair``) keeps site.key and sends only site.pub. Private keys are
created with mode 0600 from the first byte and their folders 0700 (``fedmusk.ops.cert_files`` reads and writes the
files). Every problem is a one-line ``CertError`` that names the file.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedmusk.ops.cert_files import (
    NO_PASSPHRASE,
    CertError,
    check_dates,
    check_private_mode,
    extension,
    fingerprint,
    key_type,
    load_certificate,
    load_pem_private_key,
    need_file,
    openssh_public,
    pem_key_type,
    pem_private_key,
    private_dir,
    public_der,
    refuse_existing,
    subject_alt_names,
    utcnow,
    write_file,
)

DEFAULT_HOSTS = ("localhost", "127.0.0.1")
CA_DAYS = 3650  # the CA outlives many server certificates, so renew-server does not force re-keying every site
SITE_KEY_TYPE = "ecdsa-sha2-nistp384"  # what flower-supernode --auth-supernode-private-key and flwr register accept
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"^(\*\.)?({_LABEL}\.)*{_LABEL}$")
_ANY_ADDRESS = {"0.0.0.0", "::", ""}
_PEM_KEY_KINDS = {
    b"-----BEGIN PRIVATE KEY-----": "a PEM (PKCS#8)",
    b"-----BEGIN ENCRYPTED PRIVATE KEY-----": "an encrypted PEM (PKCS#8)",
    b"-----BEGIN EC PRIVATE KEY-----": "a PEM (SEC1)",
    b"-----BEGIN RSA PRIVATE KEY-----": "a PEM (PKCS#1)",
}


@dataclass(frozen=True)
class CertPaths:
    """Where everything lives in a coordinator's certificate folder."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca" / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca" / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "superlink" / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "superlink" / "server.key"

    @property
    def sites(self) -> Path:
        return self.root / "sites"

    def site_dir(self, name: str) -> Path:
        return self.sites / _check_site_name(name)


@dataclass(frozen=True)
class SiteKeys:
    """A site's key files; ``private_key`` is None when the site made its own pair and sent only site.pub."""

    name: str
    folder: Path
    public_key: Path
    private_key: Path | None
    fingerprint: str


# --- coordinator: CA and SuperLink certificate ---------------------------------------------------------------------


def init_ca(dir: Path, hosts: Iterable[str] = (), days: int = 825, overwrite: bool = False) -> CertPaths:
    """Create the CA and the SuperLink certificate (SAN: localhost, 127.0.0.1 and ``hosts``) in ``dir``.

    Raises CertError, before writing anything, when a CA or SuperLink file already exists and ``overwrite`` is
    False. With ``overwrite`` the copies of ca.crt in registered sites' bundles are refreshed too."""
    if Path(dir).exists() and not Path(dir).is_dir():
        raise CertError(f"{dir} is a file; give a folder for the certificates")
    paths = CertPaths(Path(dir))
    names = _general_names(hosts)  # bad host names fail before any file is touched
    if not overwrite:
        refuse_existing(paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key)
    # ECDSA P-384 rather than RSA-3072: the same curve as the site keys, comparable strength, keys generated in
    # milliseconds rather than seconds, and accepted by Flower 1.42's HTTPS SuperLink (uvicorn), its clients and gRPC.
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = _ca_certificate(ca_key, CA_DAYS)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = _server_certificate(ca_cert, ca_key, server_key, names, days, utcnow())
    private_dir(paths.ca_key.parent)
    private_dir(paths.server_key.parent)
    write_file(paths.ca_key, pem_private_key(ca_key), private=True, overwrite=overwrite)
    write_file(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), overwrite=overwrite)
    write_file(paths.server_key, pem_private_key(server_key), private=True, overwrite=overwrite)
    write_file(paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), overwrite=overwrite)
    for name in site_public_keys(paths.root):
        write_file(paths.site_dir(name) / "ca.crt", paths.ca_cert.read_bytes(), overwrite=True)
    return paths


def renew_server_cert(
    dir: Path, hosts: Iterable[str] = (), days: int = 825, *, now: dt.datetime | None = None
) -> CertPaths:
    """Issue a new SuperLink key and certificate with the existing CA; sites need nothing new.

    The new certificate keeps the host names of the current one and adds ``hosts``. The previous files are kept as
    server.crt.bak and server.key.bak (0600). ``now`` is the issuing clock (tests only)."""
    paths = CertPaths(Path(dir))
    ca_cert = load_certificate(paths.ca_cert)
    ca_key = load_pem_private_key(paths.ca_key)
    if public_der(ca_key.public_key()) != public_der(ca_cert.public_key()):
        raise CertError(f"{paths.ca_key} does not belong to {paths.ca_cert}")
    current = subject_alt_names(load_certificate(paths.server_cert)) if paths.server_cert.exists() else []
    names = _general_names([*current, *hosts])
    for path in (paths.server_cert, paths.server_key):
        if path.exists():
            write_file(path.with_name(path.name + ".bak"), path.read_bytes(), private=True, overwrite=True)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = _server_certificate(ca_cert, ca_key, server_key, names, days, now or utcnow())
    private_dir(paths.server_key.parent)
    write_file(paths.server_key, pem_private_key(server_key), private=True, overwrite=True)
    write_file(paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), overwrite=True)
    return paths


def check_server_files(dir: Path, host: str | None = None, *, now: dt.datetime | None = None) -> CertPaths:
    """What the coordinator checks before starting the SuperLink: ca.crt, server.crt and server.key exist and parse,
    the certificate is signed by the CA, matches the key, is valid now and covers ``host`` (a name or address, with
    or without port; 0.0.0.0 and :: mean any address and are not checked), and the key is not readable by group or
    others. The CA key is not needed. ``now`` is the clock (tests only)."""
    paths = CertPaths(Path(dir))
    now = now or utcnow()
    ca_cert = _load_ca(paths.ca_cert, now)
    cert = load_certificate(paths.server_cert)
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise CertError(f"{paths.server_cert} was not issued by the CA in {paths.ca_cert}") from None
    check_dates(paths.server_cert, cert, now)
    check_private_mode(paths.server_key)
    key = load_pem_private_key(paths.server_key)
    if public_der(key.public_key()) != public_der(cert.public_key()):
        raise CertError(f"{paths.server_key} does not match the certificate {paths.server_cert}")
    eku = extension(cert, x509.ExtendedKeyUsage)
    if eku is not None and ExtendedKeyUsageOID.SERVER_AUTH not in eku:
        raise CertError(f"{paths.server_cert} is not a TLS server certificate (no serverAuth extended key usage)")
    if host is not None and _host_only(host) not in _ANY_ADDRESS and not _covers(cert, _host_only(host)):
        raise CertError(
            f"{paths.server_cert} does not cover host {host!r} (it names {', '.join(subject_alt_names(cert))}); "
            f"run: fedmusk certs renew-server {paths.root} --host {_host_only(host)}"
        )
    return paths


# --- sites ---------------------------------------------------------------------------------------------------------


def site_key_pair(out_dir: Path, name: str, overwrite: bool = False) -> SiteKeys:
    """Create a site's ECDSA P-384 key pair in OpenSSH format: ``out_dir``/site.key (0600) and site.pub.

    Run on the hospital's own machine, the private key never leaves it. Raises CertError when either file exists
    and ``overwrite`` is False, or the name is not a valid site name."""
    _check_site_name(name)
    out_dir = Path(out_dir)
    key_path, pub_path = out_dir / "site.key", out_dir / "site.pub"
    if not overwrite:
        refuse_existing(key_path, pub_path)
    if not out_dir.exists():
        private_dir(out_dir)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, NO_PASSPHRASE)
    public = openssh_public(key)
    write_file(key_path, private, private=True, overwrite=overwrite)
    write_file(pub_path, public + f" fedmusk-site-{name}\n".encode(), overwrite=overwrite)
    return SiteKeys(name, out_dir, pub_path, key_path, fingerprint(public))


def add_site(dir: Path, name: str, public_key: Path | None = None, overwrite: bool = False) -> SiteKeys:
    """Register a site in the coordinator's folder and write its bundle sites/<name>/ (always with ca.crt).

    With ``public_key`` (the site.pub a hospital sent) the key is validated and copied; without, a key pair is
    generated in the bundle. Raises CertError for a bad name, a key that is not ecdsa-sha2-nistp384, a key already
    registered under another name, or an existing site without ``overwrite``."""
    paths = CertPaths(Path(dir))
    folder = paths.site_dir(name)
    load_certificate(paths.ca_cert)  # the CA must exist before there is anything to hand out
    line = fp = None
    if public_key is not None:
        line = _read_site_public_key(Path(public_key))
        fp = fingerprint(line)
        for other, other_pub in site_public_keys(paths.root).items():
            if other != name and fingerprint(other_pub.read_bytes()) == fp:
                raise CertError(f"{public_key} is already registered as site {other!r} ({other_pub})")
    if not overwrite:
        refuse_existing(folder / "site.pub", folder / "site.key")
    private_dir(folder)
    write_file(folder / "ca.crt", paths.ca_cert.read_bytes(), overwrite=True)
    if line is None:
        return site_key_pair(folder, name, overwrite=overwrite)
    write_file(folder / "site.pub", line + b"\n", overwrite=overwrite)
    (folder / "site.key").unlink(missing_ok=True)  # a key generated here earlier no longer matches site.pub
    return SiteKeys(name, folder, folder / "site.pub", None, fp)


def site_public_keys(dir: Path) -> dict[str, Path]:
    """The registered sites' public key files (sites/<name>/site.pub), sorted by site name; folders whose name is
    not a site name (made by hand) are not sites."""
    found = sorted(CertPaths(Path(dir)).sites.glob("*/site.pub"), key=lambda p: p.parent.name)
    return {p.parent.name: p for p in found if _SITE_NAME.match(p.parent.name)}


def check_site_files(ca_cert: Path, private_key: Path, *, now: dt.datetime | None = None) -> str:
    """What a hospital's SuperNode checks at start: ``ca_cert`` is a valid CA certificate and ``private_key`` is an
    unencrypted OpenSSH ECDSA P-384 key with mode 0600 or stricter. Returns the public key's SHA-256 fingerprint
    (``SHA256:...``), which is safe to log."""
    _load_ca(Path(ca_cert), now or utcnow())
    path = Path(private_key)
    check_private_mode(path)
    data = path.read_bytes()
    expected = f"expected an unencrypted OpenSSH {SITE_KEY_TYPE} key (create one with: fedmusk certs site-key)"
    for header, kind in _PEM_KEY_KINDS.items():
        if header in data:
            raise CertError(f"{path} is {kind} {pem_key_type(data)} private key; {expected}")
    if b"-----BEGIN OPENSSH PRIVATE KEY-----" not in data:
        raise CertError(f"{path} is not a private key file; {expected}")
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except TypeError:
        raise CertError(f"{path} is encrypted with a passphrase flower-supernode cannot enter; {expected}") from None
    except (ValueError, UnsupportedAlgorithm) as err:
        raise CertError(f"{path} is not a readable OpenSSH private key ({err}); {expected}") from None
    if not (isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP384R1)):
        raise CertError(f"{path} is an OpenSSH {key_type(key)} key; {expected}")
    return fingerprint(openssh_public(key))


# --- internals -----------------------------------------------------------------------------------------------------


def _ca_certificate(key: ec.EllipticCurvePrivateKey, days: int) -> x509.Certificate:
    now = utcnow()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedmusk"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"fedmusk federation CA {ski.digest[:4].hex()}"),
    ])
    usage = dict.fromkeys(("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
                           "key_agreement", "encipher_only", "decipher_only"), False)
    return (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(key_cert_sign=True, crl_sign=True, **usage), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA384())
    )


def _server_certificate(ca_cert, ca_key, key, names: list[x509.GeneralName], days: int, now: dt.datetime):
    if days < 1:
        raise CertError(f"a certificate must be valid for at least one day, not {days}")
    # a certificate must not outlive its issuer: clients would reject it once the CA expires anyway
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    usage = dict.fromkeys(("content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
                           "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"), False)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedmusk SuperLink")]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, **usage), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )


def _general_names(hosts: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in (*DEFAULT_HOSTS, *hosts):
        host = host.strip().strip("[]")
        try:
            name: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            if not _DNS_NAME.match(host):
                raise CertError(f"{host!r} is neither a DNS name nor an IP address (give it without port)") from None
            name = x509.DNSName(host.lower())
        if name not in names:
            names.append(name)
    return names


def _host_only(address: str) -> str:
    """'link:9092' -> 'link', '[::1]:9092' -> '::1'; a bare IPv6 address stays whole."""
    if address.startswith("["):
        return address[1:].partition("]")[0]
    host, colon, port = address.rpartition(":")
    return host if colon and port.isdigit() and ":" not in host else address


def _covers(cert: x509.Certificate, host: str) -> bool:
    san = extension(cert, x509.SubjectAlternativeName)
    if san is None:
        return False
    try:
        return ipaddress.ip_address(host) in san.get_values_for_type(x509.IPAddress)
    except ValueError:
        host = host.lower().rstrip(".")
    return any(
        name.lower() == host or (name.startswith("*.") and host.partition(".")[2] == name[2:].lower())
        for name in san.get_values_for_type(x509.DNSName)
    )


def _load_ca(path: Path, now: dt.datetime) -> x509.Certificate:
    cert = load_certificate(path)
    bc = extension(cert, x509.BasicConstraints)
    if bc is None or not bc.ca:
        subject = cert.subject.rfc4514_string()
        raise CertError(f"{path} is not a CA certificate (it is the certificate of {subject!r}); use the CA's ca.crt")
    check_dates(path, cert, now)
    return cert


def _read_site_public_key(path: Path) -> bytes:
    need_file(path)
    data = path.read_bytes().strip()
    if b"PRIVATE KEY" in data:
        raise CertError(f"{path} is a private key; ask the site for its public key site.pub (site.key stays there)")
    kind = data.split()[0].decode(errors="replace")[:40] if data.split() else "nothing"
    try:
        key = serialization.load_ssh_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise CertError(f"{path} is not an OpenSSH public key (it starts {kind!r}); expected {SITE_KEY_TYPE}") from None
    if kind != SITE_KEY_TYPE or not isinstance(key, ec.EllipticCurvePublicKey):
        raise CertError(f"{path} holds a {kind} key; expected {SITE_KEY_TYPE} (made by: fedmusk certs site-key)")
    return data


def _check_site_name(name: str) -> str:
    if not _SITE_NAME.match(name):
        raise CertError(f"invalid site name {name!r}: use 1-64 letters, digits, '_', '.', '-', starting alphanumeric")
    return name
