"""What `fedmusk server` and `fedmusk client` refuse before starting anything, in the operator's words.

These checks run before any Flower process exists: a coordinator or hospital with a mistake gets one line and exit
code 2 (which the systemd units do not restart), and development mode without TLS is confined to loopback."""

from __future__ import annotations

import shutil

import pytest
from typer.testing import CliRunner

from fedmusk.cli import app
from fedmusk.ops.certs import add_site, init_ca

runner = CliRunner()


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    root = tmp_path_factory.mktemp("certs") / "certs"
    init_ca(root)
    add_site(root, "site-1")
    return root


@pytest.fixture
def site(small_cohort, tmp_path):
    copy = tmp_path / "site-1"
    shutil.copytree(small_cohort[0], copy, ignore=shutil.ignore_patterns(".fedmusk"))
    return copy


def client(site, certs, *extra):
    bundle = certs / "sites" / "site-1"
    args = ["client", str(site), "--name", "site-1", "--superlink", "127.0.0.1:1", "--ca", str(bundle / "ca.crt"),
            "--key", str(bundle / "site.key"), "--quick", *extra]  # fmt: skip
    return runner.invoke(app, args)


def one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "Traceback" not in text
    for needle in needles:
        assert needle in text, text


def test_coordinator_refuses_development_mode_off_loopback(tmp_path):
    result = runner.invoke(
        app, ["server", "configs/demo.yaml", "--dev-insecure", "--host", "0.0.0.0", "--state", str(tmp_path)]
    )
    one_line_error(result, "--dev-insecure", "refused on --host 0.0.0.0")


def test_there_is_no_plain_insecure_switch(tmp_path):
    for command in (["server", "configs/demo.yaml"], ["client", str(tmp_path), "--name", "a", "--superlink", "h:1"]):
        result = runner.invoke(app, [*command, "--insecure"])
        assert result.exit_code == 2 and "No such option" in result.output


def test_coordinator_without_registered_sites_is_told_how_to_add_them(tmp_path):
    root = tmp_path / "certs"
    init_ca(root)
    result = runner.invoke(app, ["server", "configs/demo.yaml", "--certs", str(root), "--state", str(tmp_path / "s")])
    one_line_error(result, "no site is registered", "fedmusk certs add-site")


def test_coordinator_refuses_a_host_its_certificate_does_not_name(certs, tmp_path):
    result = runner.invoke(
        app, ["server", "configs/demo.yaml", "--certs", str(certs), "--host", "10.1.2.3", "--state", str(tmp_path)]
    )
    one_line_error(result, "10.1.2.3")


def test_coordinator_will_not_resume_a_federation_that_never_completed_a_round(certs, tmp_path):
    result = runner.invoke(
        app, ["server", "configs/demo.yaml", "--certs", str(certs), "--state", str(tmp_path), "--resume"]
    )
    one_line_error(result, "nothing to resume")


def test_client_refuses_a_world_readable_key(site, certs, tmp_path):
    key = tmp_path / "site.key"
    shutil.copy(certs / "sites" / "site-1" / "site.key", key)
    key.chmod(0o644)
    result = client(site, certs, "--key", str(key))
    one_line_error(result, "chmod 600")


def test_client_refuses_a_certificate_that_is_not_a_ca(site, certs):
    result = client(site, certs, "--ca", str(certs / "superlink" / "server.crt"))
    one_line_error(result, "server.crt")


def test_client_refuses_invalid_site_data(site, certs):
    manifest = site / "manifest.csv"
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join([lines[0].replace("case_id", "patient"), *lines[1:]]) + "\n")
    result = client(site, certs)
    one_line_error(result, "has problems", "fedmusk validate")


def test_client_refuses_a_policy_with_a_typo(site, certs):
    policy = site / "site-policy.yaml"
    policy.write_text("max_update_nrom: 10\n")
    result = client(site, certs)
    one_line_error(result, "max_update_nrom")


def test_client_refuses_a_superlink_address_without_a_port(site, certs):
    result = client(site, certs, "--superlink", "coordinator.example.org")
    one_line_error(result, "is not HOST:PORT")


def test_client_refuses_a_runtime_port_already_in_use(site, certs):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = client(site, certs, "--runtime-port", str(taken.getsockname()[1]))
    one_line_error(result, "--runtime-port")


def test_coordinator_refuses_one_port_for_both_the_public_proxy_and_the_superlink(certs, tmp_path):
    result = runner.invoke(
        app, ["server", "configs/demo.yaml", "--certs", str(certs), "--state", str(tmp_path), "--port", "9300",
              "--superlink-port", "9300"],
    )  # fmt: skip
    one_line_error(result, "--superlink-port and --port are both 9300")
