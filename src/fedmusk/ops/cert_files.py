"""Certificate and key files of a federation: reading, fingerprints, host names, and private writes.

The primitives ``fedmusk.ops.certs`` builds the CA, the SuperLink certificate and the site keys from: load a PEM
certificate or key, the fingerprints operators compare by phone, the names a certificate covers, the validity and
file-mode checks, and writes that create private files 0600 from the first byte. Every problem is a one-line
``CertError`` that names the file.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import os
import stat
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

NO_PASSPHRASE = serialization.NoEncryption()  # flower-supernode and gRPC read keys without asking for a passphrase


class CertError(Exception):
    """A certificate or key problem the operator must fix; the message is one line and names the file."""


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
    need_file(path)
    data = path.read_bytes()
    if b"PRIVATE KEY-----" in data:
        raise CertError(f"{path} holds a private key, not a certificate")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise CertError(f"{path} is not a PEM certificate") from None


def subject_alt_names(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses the certificate is valid for, as strings."""
    san = extension(cert, x509.SubjectAlternativeName)
    if san is None:
        return []
    return [*san.get_values_for_type(x509.DNSName), *map(str, san.get_values_for_type(x509.IPAddress))]


def check_dates(path: Path, cert: x509.Certificate, now: dt.datetime) -> None:
    """CertError when ``cert`` (read from ``path``) is not yet or no longer valid at ``now``."""
    if now < cert.not_valid_before_utc:
        start = cert.not_valid_before_utc
        raise CertError(f"{path} is not valid before {start:%Y-%m-%d %H:%M} UTC (check this machine's clock)")
    if now > cert.not_valid_after_utc:
        raise CertError(f"{path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")


def check_private_mode(path: Path) -> None:
    """CertError when the key file ``path`` is missing or readable by group or others."""
    need_file(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if os.name == "posix" and mode & 0o077:
        raise CertError(f"{path} is readable by other users (mode {mode:04o}); run: chmod 600 {path}")


def load_pem_private_key(path: Path):
    """The unencrypted PEM private key in ``path``; CertError when it is missing, encrypted or not a key."""
    need_file(path)
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except TypeError:
        raise CertError(f"{path} is encrypted; the SuperLink needs an unencrypted PEM key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise CertError(f"{path} is not a PEM private key") from None


def key_type(key) -> str:
    """'ECDSA P-256', 'RSA-2048', 'Ed25519', ...: what an operator would call the private key's type."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return {"secp256r1": "ECDSA P-256", "secp384r1": "ECDSA P-384", "secp521r1": "ECDSA P-521"}.get(
            key.curve.name, f"ECDSA {key.curve.name}"
        )
    if isinstance(key, rsa.RSAPrivateKey):
        return f"RSA-{key.key_size}"
    return type(key).__name__.removesuffix("PrivateKey")  # Ed25519, Ed448, DSA


def pem_key_type(data: bytes) -> str:
    """``key_type`` of the PEM private key in ``data``, or a note that it cannot be read without a passphrase."""
    try:
        return key_type(serialization.load_pem_private_key(data, password=None))
    except (TypeError, ValueError, UnsupportedAlgorithm):
        return "(unreadable or encrypted)"


def extension(cert: x509.Certificate, kind):
    """The value of the certificate's extension of class ``kind``, or None when it has none."""
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def public_der(key) -> bytes:
    """The public key as DER SubjectPublicKeyInfo: equal bytes mean a key and a certificate belong together."""
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def pem_private_key(key) -> bytes:
    """The private key as unencrypted PEM (PKCS#8), what the SuperLink and gRPC read."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, NO_PASSPHRASE)


def openssh_public(key) -> bytes:
    """The public half of a private key as an OpenSSH public key line (without comment)."""
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def need_file(path: Path) -> None:
    """CertError when ``path`` is a folder or does not exist."""
    if path.is_dir():
        raise CertError(f"{path} is a folder; give the file itself")
    if not path.is_file():
        raise CertError(f"{path} does not exist")


def refuse_existing(*paths: Path) -> None:
    """CertError naming the first of ``paths`` that exists: files are replaced only with --force."""
    for path in paths:
        if path.exists():
            raise CertError(f"{path} already exists; refusing to replace it: pass --force or use another folder")


def private_dir(path: Path) -> None:
    """Create ``path`` (and parents) for private keys, mode 0700 also when it existed."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)  # also when it existed: the folder holds private keys


def write_file(path: Path, data: bytes, *, private: bool = False, overwrite: bool = False) -> None:
    """Write ``data``; private files are 0600 from creation. Without ``overwrite`` the file must not exist (O_EXCL);
    with it, the new content replaces the old atomically (a temporary file in the same folder, then os.replace)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    mode = 0o600 if private else 0o644
    if not overwrite:
        refuse_existing(path)
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


def utcnow() -> dt.datetime:
    """The current time, timezone-aware in UTC, as certificates compare it."""
    return dt.datetime.now(dt.timezone.utc)
