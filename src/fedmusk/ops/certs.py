"""Certificates and node keys for a real Flower deployment: one CA, one SuperLink TLS certificate, one key per site.

The coordinator's certificate folder DIR::

    DIR/ca/ca.crt, ca.key                 the federation's CA (ca.key stays with the coordinator, ideally offline)
    DIR/superlink/server.crt, server.key  the SuperLink's TLS certificate, signed by the CA
    DIR/sites/<name>/site.pub             the site's OpenSSH public key (what `flwr supernode register` takes)
    DIR/sites/<name>/site.key             only when the coordinator generated the pair for the site
    DIR/sites/<name>/ca.crt               a copy of the CA certificate: sites/<name>/ is the bundle for that hospital

A hospital that makes its own key pair (``site_key_pair``) keeps site.key and sends only site.pub. Private keys are
created with mode 0600 from the first byte and their folders 0700. Every problem is a one-line ``CertError`` that
names the file.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
import re
import stat
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("localhost", "127.0.0.1")
CA_DAYS = 3650  # the CA outlives many server certificates, so renew-server does not force re-keying every site
SITE_KEY_TYPE = "ecdsa-sha2-nistp384"  # what flower-supernode --auth-supernode-private-key and flwr register accept
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"^(\*\.)?({_LABEL}\.)*{_LABEL}$")
_ANY_ADDRESS = {"0.0.0.0", "::", ""}
_NO_PASSPHRASE = serialization.NoEncryption()  # flower-supernode and gRPC read keys without asking for a passphrase
_PEM_KEY_KINDS = {
    b"-----BEGIN PRIVATE KEY-----": "a PEM (PKCS#8)",
    b"-----BEGIN ENCRYPTED PRIVATE KEY-----": "an encrypted PEM (PKCS#8)",
    b"-----BEGIN EC PRIVATE KEY-----": "a PEM (SEC1)",
    b"-----BEGIN RSA PRIVATE KEY-----": "a PEM (PKCS#1)",
}


class CertError(Exception):
    """A certificate or key problem the operator must fix; the message is one line and names the file."""


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
        _refuse_existing(paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key)
    # ECDSA P-384 rather than RSA-3072: the same curve as the site keys, comparable strength, keys generated in
    # milliseconds rather than seconds, and accepted by Flower 1.42's HTTPS SuperLink (uvicorn), its clients and gRPC.
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = _ca_certificate(ca_key, CA_DAYS)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = _server_certificate(ca_cert, ca_key, server_key, names, days, _utcnow())
    _private_dir(paths.ca_key.parent)
    _private_dir(paths.server_key.parent)
    _write(paths.ca_key, _pem_key(ca_key), private=True, overwrite=overwrite)
    _write(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), overwrite=overwrite)
    _write(paths.server_key, _pem_key(server_key), private=True, overwrite=overwrite)
    _write(paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), overwrite=overwrite)
    for name in site_public_keys(paths.root):
        _write(paths.site_dir(name) / "ca.crt", paths.ca_cert.read_bytes(), overwrite=True)
    return paths


def renew_server_cert(
    dir: Path, hosts: Iterable[str] = (), days: int = 825, *, now: dt.datetime | None = None
) -> CertPaths:
    """Issue a new SuperLink key and certificate with the existing CA; sites need nothing new.

    The new certificate keeps the host names of the current one and adds ``hosts``. The previous files are kept as
    server.crt.bak and server.key.bak (0600). ``now`` is the issuing clock (tests only)."""
    paths = CertPaths(Path(dir))
    ca_cert = load_certificate(paths.ca_cert)
    ca_key = _load_pem_private_key(paths.ca_key)
    if _public_der(ca_key.public_key()) != _public_der(ca_cert.public_key()):
        raise CertError(f"{paths.ca_key} does not belong to {paths.ca_cert}")
    current = subject_alt_names(load_certificate(paths.server_cert)) if paths.server_cert.exists() else []
    names = _general_names([*current, *hosts])
    for path in (paths.server_cert, paths.server_key):
        if path.exists():
            _write(path.with_name(path.name + ".bak"), path.read_bytes(), private=True, overwrite=True)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = _server_certificate(ca_cert, ca_key, server_key, names, days, now or _utcnow())
    _private_dir(paths.server_key.parent)
    _write(paths.server_key, _pem_key(server_key), private=True, overwrite=True)
    _write(paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), overwrite=True)
    return paths


def check_server_files(dir: Path, host: str | None = None, *, now: dt.datetime | None = None) -> CertPaths:
    """What the coordinator checks before starting the SuperLink: ca.crt, server.crt and server.key exist and parse,
    the certificate is signed by the CA, matches the key, is valid now and covers ``host`` (a name or address, with
    or without port; 0.0.0.0 and :: mean any address and are not checked), and the key is not readable by group or
    others. The CA key is not needed. ``now`` is the clock (tests only)."""
    paths = CertPaths(Path(dir))
    now = now or _utcnow()
    ca_cert = _load_ca(paths.ca_cert, now)
    cert = load_certificate(paths.server_cert)
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise CertError(f"{paths.server_cert} was not issued by the CA in {paths.ca_cert}") from None
    _check_dates(paths.server_cert, cert, now)
    _check_private_mode(paths.server_key)
    key = _load_pem_private_key(paths.server_key)
    if _public_der(key.public_key()) != _public_der(cert.public_key()):
        raise CertError(f"{paths.server_key} does not match the certificate {paths.server_cert}")
    eku = _extension(cert, x509.ExtendedKeyUsage)
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
        _refuse_existing(key_path, pub_path)
    if not out_dir.exists():
        _private_dir(out_dir)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, _NO_PASSPHRASE)
    public = _openssh_public(key)
    _write(key_path, private, private=True, overwrite=overwrite)
    _write(pub_path, public + f" fedmusk-site-{name}\n".encode(), overwrite=overwrite)
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
        _refuse_existing(folder / "site.pub", folder / "site.key")
    _private_dir(folder)
    _write(folder / "ca.crt", paths.ca_cert.read_bytes(), overwrite=True)
    if line is None:
        return site_key_pair(folder, name, overwrite=overwrite)
    _write(folder / "site.pub", line + b"\n", overwrite=overwrite)
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
    _load_ca(Path(ca_cert), now or _utcnow())
    path = Path(private_key)
    _check_private_mode(path)
    data = path.read_bytes()
    expected = f"expected an unencrypted OpenSSH {SITE_KEY_TYPE} key (create one with: fedmusk certs site-key)"
    for header, kind in _PEM_KEY_KINDS.items():
        if header in data:
            raise CertError(f"{path} is {kind} {_pem_key_type(data)} private key; {expected}")
    if b"-----BEGIN OPENSSH PRIVATE KEY-----" not in data:
        raise CertError(f"{path} is not a private key file; {expected}")
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except TypeError:
        raise CertError(f"{path} is encrypted with a passphrase flower-supernode cannot enter; {expected}") from None
    except (ValueError, UnsupportedAlgorithm) as err:
        raise CertError(f"{path} is not a readable OpenSSH private key ({err}); {expected}") from None
    if not (isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP384R1)):
        raise CertError(f"{path} is an OpenSSH {_key_type(key)} key; {expected}")
    return fingerprint(_openssh_public(key))


# --- reading -------------------------------------------------------------------------------------------------------


def fingerprint(public_key_openssh: bytes | str) -> str:
    """OpenSSH's SHA-256 fingerprint of a public key line (``SHA256:`` + unpadded base64), as ssh-keygen -l prints."""
    text = public_key_openssh.decode() if isinstance(public_key_openssh, bytes) else public_key_openssh
    fields = text.split()
    try:
        blob = base64.b64decode(fields[1], validate=True)
    except (IndexError, ValueError):
        raise CertError("not an OpenSSH public key line ('<type> <base64> [comment]')") from None
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def certificate_fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER bytes as colon-separated hex, for operators to compare by phone."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def load_certificate(path: Path) -> x509.Certificate:
    """The PEM certificate in ``path``; CertError when it is missing or is not a certificate."""
    path = Path(path)
    _need_file(path)
    data = path.read_bytes()
    if b"PRIVATE KEY-----" in data:
        raise CertError(f"{path} holds a private key, not a certificate")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise CertError(f"{path} is not a PEM certificate") from None


def subject_alt_names(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses the certificate is valid for, as strings."""
    san = _extension(cert, x509.SubjectAlternativeName)
    if san is None:
        return []
    return [*san.get_values_for_type(x509.DNSName), *map(str, san.get_values_for_type(x509.IPAddress))]


# --- internals -----------------------------------------------------------------------------------------------------


def _ca_certificate(key: ec.EllipticCurvePrivateKey, days: int) -> x509.Certificate:
    now = _utcnow()
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
    san = _extension(cert, x509.SubjectAlternativeName)
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
    bc = _extension(cert, x509.BasicConstraints)
    if bc is None or not bc.ca:
        subject = cert.subject.rfc4514_string()
        raise CertError(f"{path} is not a CA certificate (it is the certificate of {subject!r}); use the CA's ca.crt")
    _check_dates(path, cert, now)
    return cert


def _check_dates(path: Path, cert: x509.Certificate, now: dt.datetime) -> None:
    if now < cert.not_valid_before_utc:
        start = cert.not_valid_before_utc
        raise CertError(f"{path} is not valid before {start:%Y-%m-%d %H:%M} UTC (check this machine's clock)")
    if now > cert.not_valid_after_utc:
        raise CertError(f"{path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")


def _check_private_mode(path: Path) -> None:
    _need_file(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if os.name == "posix" and mode & 0o077:
        raise CertError(f"{path} is readable by other users (mode {mode:04o}); run: chmod 600 {path}")


def _load_pem_private_key(path: Path):
    _need_file(path)
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except TypeError:
        raise CertError(f"{path} is encrypted; the SuperLink needs an unencrypted PEM key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise CertError(f"{path} is not a PEM private key") from None


def _read_site_public_key(path: Path) -> bytes:
    _need_file(path)
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


def _key_type(key) -> str:
    """'ECDSA P-256', 'RSA-2048', 'Ed25519', ...: what an operator would call the private key's type."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return {"secp256r1": "ECDSA P-256", "secp384r1": "ECDSA P-384", "secp521r1": "ECDSA P-521"}.get(
            key.curve.name, f"ECDSA {key.curve.name}"
        )
    if isinstance(key, rsa.RSAPrivateKey):
        return f"RSA-{key.key_size}"
    return type(key).__name__.removesuffix("PrivateKey")  # Ed25519, Ed448, DSA


def _pem_key_type(data: bytes) -> str:
    try:
        return _key_type(serialization.load_pem_private_key(data, password=None))
    except (TypeError, ValueError, UnsupportedAlgorithm):
        return "(unreadable or encrypted)"


def _extension(cert: x509.Certificate, kind):
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _public_der(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, _NO_PASSPHRASE)


def _openssh_public(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def _need_file(path: Path) -> None:
    if path.is_dir():
        raise CertError(f"{path} is a folder; give the file itself")
    if not path.is_file():
        raise CertError(f"{path} does not exist")


def _refuse_existing(*paths: Path) -> None:
    for path in paths:
        if path.exists():
            raise CertError(f"{path} already exists; refusing to replace it: pass --force or use another folder")


def _check_site_name(name: str) -> str:
    if not _SITE_NAME.match(name):
        raise CertError(f"invalid site name {name!r}: use 1-64 letters, digits, '_', '.', '-', starting alphanumeric")
    return name


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)  # also when it existed: the folder holds private keys


def _write(path: Path, data: bytes, *, private: bool = False, overwrite: bool = False) -> None:
    """Write ``data``; private files are 0600 from creation. Without ``overwrite`` the file must not exist (O_EXCL);
    with it, the new content replaces the old atomically (a temporary file in the same folder, then os.replace)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    mode = 0o600 if private else 0o644
    if not overwrite:
        _refuse_existing(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)  # O_EXCL: never follow or reuse a file
        target = path
    else:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp creates files 0600
        target = Path(tmp)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            if not private:
                os.chmod(target, mode)  # widening a public file (a certificate) to 0644 is intended
            os.replace(target, path)
    except BaseException:
        target.unlink(missing_ok=True)
        raise


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)

