"""The coordinator's CA, the SuperLink TLS certificate and the sites' node keys (fedmusk.ops.certs, `fedmusk certs`)."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import socket
import ssl
import stat
import subprocess
import threading

import pytest
import typer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from typer.testing import CliRunner

from fedmusk.ops import cert_files, certs, certs_cli
from fedmusk.ops.cert_files import CertError
from fedmusk.ops.certs import CertPaths

posix_only = pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")


@pytest.fixture
def ca_dir(tmp_path):
    return certs.init_ca(tmp_path / "certs", hosts=["link.example.org", "10.0.0.5"]).root


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _handshake(paths: CertPaths, trusted_ca, server_hostname: str) -> None:
    """A real TLS handshake over a socket pair: server.crt/server.key against a client that trusts ``trusted_ca``.
    Raises the client's ssl error when the client refuses the server."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(paths.server_cert, paths.server_key)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED by default
    client_ctx.load_verify_locations(cafile=trusted_ca)
    a, b = socket.socketpair()
    server = server_ctx.wrap_socket(a, server_side=True, do_handshake_on_connect=False)
    client = client_ctx.wrap_socket(b, server_hostname=server_hostname, do_handshake_on_connect=False)

    def serve():
        try:
            server.do_handshake()
            server.sendall(server.recv(5))
        except (ssl.SSLError, OSError):
            pass  # the client refused us; its error is the one under test

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        client.settimeout(10)
        client.do_handshake()
        client.sendall(b"hello")
        assert client.recv(5) == b"hello"
    finally:
        client.close()
        thread.join(10)
        server.close()


# --- the CA and the SuperLink certificate --------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "link.example.org", "10.0.0.5"])
def test_superlink_certificate_completes_a_tls_handshake_with_a_client_trusting_the_ca(ca_dir, host):
    paths = CertPaths(ca_dir)
    _handshake(paths, paths.ca_cert, host)


def test_a_client_trusting_another_ca_refuses_the_superlink(ca_dir, tmp_path):
    other = certs.init_ca(tmp_path / "other")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(CertPaths(ca_dir), other.ca_cert, "localhost")


def test_a_client_refuses_a_host_name_the_certificate_does_not_name(ca_dir):
    paths = CertPaths(ca_dir)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(paths, paths.ca_cert, "elsewhere.example.org")


def test_ca_is_a_ca_that_may_only_sign_leaf_certificates(ca_dir):
    from cryptography import x509

    ca = cert_files.load_certificate(CertPaths(ca_dir).ca_cert)
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert constraints.ca and constraints.path_length == 0
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)


@posix_only
def test_private_keys_are_0600_and_the_folders_holding_them_0700(ca_dir):
    paths = CertPaths(ca_dir)
    site = certs.add_site(ca_dir, "hosp-a")
    for key in (paths.ca_key, paths.server_key, site.private_key):
        assert _mode(key) == 0o600, key
        assert _mode(key.parent) == 0o700, key.parent
    assert _mode(paths.ca_cert) == 0o644


def test_rerunning_init_refuses_and_leaves_the_keys_untouched(ca_dir):
    paths = CertPaths(ca_dir)
    before = {p: p.read_bytes() for p in (paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key)}
    with pytest.raises(CertError, match=r"ca\.crt already exists.*--force"):
        certs.init_ca(ca_dir)
    assert {p: p.read_bytes() for p in before} == before


def test_init_with_overwrite_replaces_the_ca_and_refreshes_the_site_bundles(ca_dir):
    paths = CertPaths(ca_dir)
    certs.add_site(ca_dir, "hosp-a")
    old_key = paths.ca_key.read_bytes()
    certs.init_ca(ca_dir, overwrite=True)
    assert paths.ca_key.read_bytes() != old_key
    assert (paths.sites / "hosp-a" / "ca.crt").read_bytes() == paths.ca_cert.read_bytes()
    certs.check_server_files(ca_dir)
    if os.name == "posix":
        assert _mode(paths.ca_key) == 0o600


def test_bad_host_names_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(CertError, match="neither a DNS name nor an IP address"):
        certs.init_ca(tmp_path / "certs", hosts=["link.example.org:9092"])
    assert not (tmp_path / "certs").exists()


def test_renewing_keeps_the_old_names_adds_new_ones_and_backs_up_the_old_files(ca_dir):
    paths = CertPaths(ca_dir)
    old_cert, old_key = paths.server_cert.read_bytes(), paths.server_key.read_bytes()
    ca_before = paths.ca_cert.read_bytes()
    certs.renew_server_cert(ca_dir, hosts=["new.example.org"])
    names = cert_files.subject_alt_names(cert_files.load_certificate(paths.server_cert))
    assert {"localhost", "127.0.0.1", "link.example.org", "10.0.0.5", "new.example.org"} <= set(names)
    assert paths.server_key.read_bytes() != old_key
    assert paths.server_cert.with_name("server.crt.bak").read_bytes() == old_cert
    assert paths.server_key.with_name("server.key.bak").read_bytes() == old_key
    assert paths.ca_cert.read_bytes() == ca_before
    certs.check_server_files(ca_dir, "new.example.org")
    if os.name == "posix":
        assert _mode(paths.server_key) == 0o600
        assert _mode(paths.server_key.with_name("server.key.bak")) == 0o600


# --- check_server_files ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [None, "link.example.org", "LINK.example.org", "10.0.0.5", "link.example.org:9092", "0.0.0.0:9092", "::", "[::]:1"],
)
def test_server_check_accepts_fresh_files_for_named_and_any_addresses(ca_dir, host):
    assert certs.check_server_files(ca_dir, host).server_cert.exists()


def test_server_check_refuses_a_key_that_does_not_match_the_certificate(ca_dir, tmp_path):
    other = certs.init_ca(tmp_path / "other")
    shutil.copyfile(other.server_key, CertPaths(ca_dir).server_key)
    with pytest.raises(CertError, match=r"server\.key does not match the certificate"):
        certs.check_server_files(ca_dir)


def test_server_check_refuses_a_certificate_from_another_ca(ca_dir, tmp_path):
    other, paths = certs.init_ca(tmp_path / "other"), CertPaths(ca_dir)
    shutil.copyfile(other.server_cert, paths.server_cert)
    shutil.copyfile(other.server_key, paths.server_key)
    with pytest.raises(CertError, match=r"server\.crt was not issued by the CA"):
        certs.check_server_files(ca_dir)


def test_server_check_refuses_an_expired_certificate_naming_the_date(ca_dir):
    issued = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=30)
    certs.renew_server_cert(ca_dir, days=2, now=issued)
    with pytest.raises(CertError, match=rf"server\.crt expired on {(issued + dt.timedelta(days=2)):%Y-%m-%d}"):
        certs.check_server_files(ca_dir)


def test_server_check_refuses_a_certificate_not_yet_valid(ca_dir):
    with pytest.raises(CertError, match="is not valid before .* clock"):
        certs.check_server_files(ca_dir, now=dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc))


def test_server_check_refuses_a_host_the_certificate_does_not_cover(ca_dir):
    with pytest.raises(CertError, match=r"does not cover host 'hub\.example\.org'.*renew-server"):
        certs.check_server_files(ca_dir, "hub.example.org")
    with pytest.raises(CertError, match="does not cover host '10.0.0.6'"):
        certs.check_server_files(ca_dir, "10.0.0.6")


@posix_only
def test_server_check_refuses_a_group_readable_key(ca_dir):
    key = CertPaths(ca_dir).server_key
    key.chmod(0o640)
    with pytest.raises(CertError, match=rf"mode 0640\); run: chmod 600 {key}"):
        certs.check_server_files(ca_dir)


def test_server_check_names_a_missing_file(ca_dir):
    CertPaths(ca_dir).server_key.unlink()
    with pytest.raises(CertError, match=r"server\.key does not exist"):
        certs.check_server_files(ca_dir)


# --- site keys -------------------------------------------------------------------------------------------------------


def test_site_key_pair_is_an_openssh_ecdsa_p384_key_flower_can_read(tmp_path):
    site = certs.site_key_pair(tmp_path / "hospital", "hosp-a")
    key = serialization.load_ssh_private_key(site.private_key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP384R1)
    line = site.public_key.read_text()
    assert line.startswith("ecdsa-sha2-nistp384 AAAA") and line.rstrip().endswith(" fedmusk-site-hosp-a")
    assert len(line.splitlines()) == 1
    public = serialization.load_ssh_public_key(line.encode())
    assert public.public_numbers() == key.public_key().public_numbers()
    if os.name == "posix":
        assert _mode(site.private_key) == 0o600


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs OpenSSH's ssh-keygen")
def test_fingerprint_is_the_one_ssh_keygen_prints(tmp_path):
    site = certs.site_key_pair(tmp_path, "hosp-a")
    printed = subprocess.run(["ssh-keygen", "-lf", str(site.public_key)], capture_output=True, text=True, check=True)
    assert printed.stdout.split()[1] == site.fingerprint == cert_files.fingerprint(site.public_key.read_bytes())


def test_site_key_pair_refuses_to_replace_an_existing_key(tmp_path):
    site = certs.site_key_pair(tmp_path, "hosp-a")
    before = site.private_key.read_bytes()
    with pytest.raises(CertError, match=r"site\.key already exists"):
        certs.site_key_pair(tmp_path, "hosp-a")
    assert site.private_key.read_bytes() == before
    assert certs.site_key_pair(tmp_path, "hosp-a", overwrite=True).private_key.read_bytes() != before


def test_add_site_without_a_key_writes_a_bundle_with_key_pair_and_ca(ca_dir):
    site = certs.add_site(ca_dir, "hosp-a")
    assert site.folder == CertPaths(ca_dir).sites / "hosp-a"
    assert sorted(p.name for p in site.folder.iterdir()) == ["ca.crt", "site.key", "site.pub"]
    assert (site.folder / "ca.crt").read_bytes() == CertPaths(ca_dir).ca_cert.read_bytes()
    assert certs.check_site_files(site.folder / "ca.crt", site.private_key) == site.fingerprint


def test_add_site_copies_a_hospitals_public_key_and_holds_no_private_key(ca_dir, tmp_path):
    hospital = certs.site_key_pair(tmp_path / "hospital", "hosp-b")
    site = certs.add_site(ca_dir, "hosp-b", public_key=hospital.public_key)
    assert site.private_key is None and site.fingerprint == hospital.fingerprint
    assert site.public_key.read_bytes() == hospital.public_key.read_bytes()
    assert sorted(p.name for p in site.folder.iterdir()) == ["ca.crt", "site.pub"]
    assert certs.check_site_files(site.folder / "ca.crt", hospital.private_key) == hospital.fingerprint


@pytest.mark.parametrize(
    ("key", "kind"),
    [(rsa.generate_private_key(65537, 2048), "ssh-rsa"), (ed25519.Ed25519PrivateKey.generate(), "ssh-ed25519"),
     (ec.generate_private_key(ec.SECP256R1()), "ecdsa-sha2-nistp256")],
)
def test_add_site_refuses_public_keys_of_another_type_naming_it(ca_dir, tmp_path, key, kind):
    pub = tmp_path / "site.pub"
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    with pytest.raises(CertError, match=rf"{pub}.* holds a {kind} key; expected ecdsa-sha2-nistp384"):
        certs.add_site(ca_dir, "hosp-a", public_key=pub)
    assert certs.site_public_keys(ca_dir) == {}


def test_add_site_refuses_a_private_key_sent_as_public_key(ca_dir, tmp_path):
    hospital = certs.site_key_pair(tmp_path / "hospital", "hosp-a")
    with pytest.raises(CertError, match="is a private key; ask the site for its public key"):
        certs.add_site(ca_dir, "hosp-a", public_key=hospital.private_key)


def test_add_site_refuses_a_key_already_registered_under_another_name(ca_dir, tmp_path):
    hospital = certs.site_key_pair(tmp_path / "hospital", "hosp-a")
    certs.add_site(ca_dir, "hosp-a", public_key=hospital.public_key)
    with pytest.raises(CertError, match="already registered as site 'hosp-a'"):
        certs.add_site(ca_dir, "hosp-z", public_key=hospital.public_key)


def test_add_site_refuses_to_replace_a_registered_site_without_overwrite(ca_dir, tmp_path):
    first = certs.add_site(ca_dir, "hosp-a")
    hospital = certs.site_key_pair(tmp_path / "hospital", "hosp-a")
    with pytest.raises(CertError, match=r"site\.pub already exists"):
        certs.add_site(ca_dir, "hosp-a", public_key=hospital.public_key)
    assert cert_files.fingerprint(first.public_key.read_bytes()) == first.fingerprint
    replaced = certs.add_site(ca_dir, "hosp-a", public_key=hospital.public_key, overwrite=True)
    assert replaced.fingerprint == hospital.fingerprint
    assert not (replaced.folder / "site.key").exists()  # the old generated key no longer matches site.pub


@pytest.mark.parametrize("name", ["", "-a", ".hidden", "a/b", "..", "a b", "hôpital", "a" * 65])
def test_add_site_refuses_bad_site_names(ca_dir, name):
    with pytest.raises(CertError, match="invalid site name"):
        certs.add_site(ca_dir, name)


def test_add_site_needs_a_ca_first(tmp_path):
    with pytest.raises(CertError, match=r"ca\.crt does not exist"):
        certs.add_site(tmp_path / "empty", "hosp-a")


def test_site_public_keys_lists_registered_sites_by_name(ca_dir):
    for name in ("zeta", "alpha", "mid.1"):
        certs.add_site(ca_dir, name)
    keys = certs.site_public_keys(ca_dir)
    assert list(keys) == ["alpha", "mid.1", "zeta"]
    assert all(p.name == "site.pub" for p in keys.values())


# --- check_site_files ------------------------------------------------------------------------------------------------


@pytest.fixture
def bundle(ca_dir):
    return certs.add_site(ca_dir, "hosp-a")


def test_site_check_refuses_the_server_certificate_as_ca(ca_dir, bundle):
    with pytest.raises(CertError, match=r"server\.crt is not a CA certificate"):
        certs.check_site_files(CertPaths(ca_dir).server_cert, bundle.private_key)


def test_site_check_refuses_a_file_that_is_not_a_certificate(bundle):
    with pytest.raises(CertError, match=r"site\.pub is not a PEM certificate"):
        certs.check_site_files(bundle.public_key, bundle.private_key)


def test_site_check_refuses_a_pem_pkcs8_key_saying_openssh_is_expected(bundle, tmp_path):
    key = tmp_path / "site.pem"
    ec_key = ec.generate_private_key(ec.SECP384R1())
    key.write_bytes(ec_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))
    key.chmod(0o600)
    with pytest.raises(CertError, match=r"PEM \(PKCS#8\) ECDSA P-384 private key; expected an unencrypted OpenSSH"):
        certs.check_site_files(bundle.folder / "ca.crt", key)


def test_site_check_refuses_an_ed25519_openssh_key(bundle, tmp_path):
    key = tmp_path / "id_ed25519"
    key.write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ))
    key.chmod(0o600)
    with pytest.raises(CertError, match="is an OpenSSH Ed25519 key; expected an unencrypted OpenSSH ecdsa-sha2"):
        certs.check_site_files(bundle.folder / "ca.crt", key)


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs OpenSSH's ssh-keygen (cryptography needs bcrypt)")
def test_site_check_refuses_a_passphrase_protected_key(bundle, tmp_path):
    key = tmp_path / "site.key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "secret", "-f", str(key)], check=True)
    with pytest.raises(CertError, match="is encrypted with a passphrase"):
        certs.check_site_files(bundle.folder / "ca.crt", key)


@posix_only
def test_site_check_refuses_a_world_readable_key_with_the_fix(bundle):
    bundle.private_key.chmod(0o644)
    with pytest.raises(CertError, match=rf"mode 0644\); run: chmod 600 {bundle.private_key}"):
        certs.check_site_files(bundle.folder / "ca.crt", bundle.private_key)


def test_site_check_returns_a_fingerprint_without_key_material(bundle):
    fingerprint = certs.check_site_files(bundle.folder / "ca.crt", bundle.private_key)
    assert fingerprint.startswith("SHA256:") and not fingerprint.endswith("=") and len(fingerprint) == 50


# --- the CLI ---------------------------------------------------------------------------------------------------------


def _cli(*args):
    main = typer.Typer()  # mounted the way fedmusk's CLI mounts it
    main.command()(lambda: None)
    main.add_typer(certs_cli.app, name="certs")
    result = CliRunner().invoke(main, ["certs", *map(str, args)])
    assert "PRIVATE KEY" not in result.output
    assert "Traceback" not in result.output
    return result


def test_cli_init_add_site_and_show_tell_the_operator_what_was_written(tmp_path):
    root = tmp_path / "certs"
    init = _cli("init", root, "--host", "link.example.org", "--days", "30")
    assert init.exit_code == 0, init.output
    ca = cert_files.load_certificate(CertPaths(root).ca_cert)
    assert cert_files.certificate_fingerprint(ca) in init.output
    assert f"fedmusk server CONFIG --certs {root}" in init.output and str(CertPaths(root).server_key) in init.output

    added = _cli("add-site", root, "hosp-a", "--generate-key-for-site")
    assert added.exit_code == 0, added.output
    site_fp = cert_files.fingerprint((root / "sites" / "hosp-a" / "site.pub").read_bytes())
    assert site_fp in added.output and "send the whole folder" in added.output

    hospital = _cli("site-key", tmp_path / "hospital", "--name", "hosp-b")
    assert "site.key never leaves this machine" in hospital.output
    sent = _cli("add-site", root, "hosp-b", "--public-key", tmp_path / "hospital" / "site.pub")
    assert sent.exit_code == 0 and "send it only" in sent.output

    renewed = _cli("renew-server", root, "--host", "10.1.2.3")
    assert renewed.exit_code == 0 and "10.1.2.3" in renewed.output

    shown = _cli("show", root)
    assert shown.exit_code == 0, shown.output
    assert "hosp-a" in shown.output and "hosp-b" in shown.output and "link.example.org" in shown.output
    assert "SuperLink files: ok" in shown.output


def test_cli_add_site_without_the_hospitals_public_key_is_refused_unless_told_to_make_the_key(tmp_path):
    root = tmp_path / "certs"
    assert _cli("init", root).exit_code == 0
    refused = _cli("add-site", root, "hosp-a")
    assert refused.exit_code == 2
    (line,) = [line for line in refused.output.splitlines() if line.strip()]
    assert line.startswith("error: ") and "--public-key site.pub" in line and "--generate-key-for-site" in line
    assert not (root / "sites" / "hosp-a").exists()
    hospital = certs.site_key_pair(tmp_path / "hospital", "hosp-a")
    both = _cli("add-site", root, "hosp-a", "--public-key", hospital.public_key, "--generate-key-for-site")
    assert both.exit_code == 2 and "exclude each other" in both.output
    made = _cli("add-site", root, "hosp-a", "--generate-key-for-site")
    assert made.exit_code == 0 and (root / "sites" / "hosp-a" / "site.key").is_file()


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path):
    root = tmp_path / "certs"
    assert _cli("init", root).exit_code == 0
    again = _cli("init", root)
    assert again.exit_code == 2
    errors = [line for line in again.output.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "--force" in errors[0]
    bad = _cli("add-site", root, "bad name", "--generate-key-for-site")
    assert bad.exit_code == 2 and bad.output.startswith("error: invalid site name")
    missing = _cli("show", tmp_path / "nowhere")
    assert missing.exit_code == 2 and missing.output.startswith("error: ")


def test_a_folder_given_as_a_key_and_init_onto_a_file_are_named(ca_dir, tmp_path):
    with pytest.raises(CertError, match="is a folder; give the file itself"):
        certs.add_site(ca_dir, "hosp-c", public_key=tmp_path)
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    result = CliRunner().invoke(certs_cli.app, ["init", str(target)])
    assert result.exit_code != 0 and "is a file; give a folder for the certificates" in " ".join(result.output.split())
    assert "Errno" not in result.output and target.read_text() == "keep me"
