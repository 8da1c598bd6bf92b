"""``fedmusk certs``: the coordinator's CA, the SuperLink certificate and the hospitals' node keys.

Mounted by the main CLI as ``app.add_typer(certs_cli.app, name="certs")``. The work is done by ``fedmusk.ops.certs``
(and the file reading by ``fedmusk.ops.cert_files``); this module only parses arguments and says what was written and
what to do next. Nothing here prints key material: only paths and fingerprints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedmusk.ops import cert_files, certs

app = typer.Typer(
    help="Certificates and node keys for a real Flower deployment: CA, SuperLink TLS certificate, site keys.",
    no_args_is_help=True,
    add_completion=False,
)
# emoji=False: rich would otherwise show a fingerprint's ":AB:" as an emoji, and operators compare them by phone
console = Console(emoji=False)
err_console = Console(stderr=True, emoji=False)

CertDir = Annotated[Path, typer.Argument(help="The coordinator's certificate folder.")]
Hosts = Annotated[
    list[str] | None,
    typer.Option("--host", help="A DNS name or IP address hospitals use to reach the SuperLink; repeat for several."),
]
Days = Annotated[int, typer.Option("--days", help="Days the SuperLink certificate stays valid.")]


def _run(fn, *args, **kwargs):
    """Certificate problems are the operator's to fix: one ``error:`` line on stderr, exit 2, no traceback."""
    try:
        return fn(*args, **kwargs)
    except (cert_files.CertError, OSError) as err:
        err_console.print(f"error: {err}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def _say(text: str = "") -> None:
    # soft_wrap: fingerprints and commands must stay whole for copying; the terminal wraps long lines for reading
    console.print(text, markup=False, highlight=False, soft_wrap=True)


@app.command()
def init(
    dir: CertDir,
    host: Hosts = None,
    days: Days = 825,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing CA and SuperLink key.")] = False,
) -> None:
    """Create the federation's CA and the SuperLink's TLS certificate (for localhost, 127.0.0.1 and each --host)."""
    paths = _run(certs.init_ca, dir, hosts=host or [], days=days, overwrite=force)
    ca = _run(cert_files.load_certificate, paths.ca_cert)
    server = _run(cert_files.load_certificate, paths.server_cert)
    _say(f"wrote the CA:         {paths.ca_cert}  {paths.ca_key}")
    _say(f"wrote the SuperLink:  {paths.server_cert}  {paths.server_key}")
    _say(f"CA fingerprint (SHA-256): {cert_files.certificate_fingerprint(ca)}")
    _say(f"SuperLink certificate valid until {server.not_valid_after_utc:%Y-%m-%d} for "
         f"{', '.join(cert_files.subject_alt_names(server))}")
    _say()
    _say(
        f"Next: register each hospital with `fedmusk certs add-site {dir} NAME --public-key site.pub` (the hospital "
        "makes its key pair with `fedmusk certs site-key` and sends only site.pub), start the federation with "
        f"`fedmusk server CONFIG --certs {dir}` (it starts the SuperLink with TLS behind its Fleet-only proxy and "
        f"registers every site key in {dir}/sites), and read the CA fingerprint to each hospital by phone so they "
        f"can check their ca.crt. Keep {paths.ca_key} offline: the SuperLink does not need it."
    )
    if force and (sites := certs.site_public_keys(dir)):
        _say(f"The CA changed: send each site its new ca.crt ({', '.join(f'sites/{n}/ca.crt' for n in sites)}).")


@app.command("add-site")
def add_site(
    dir: CertDir,
    name: Annotated[str, typer.Argument(help="The site's name (letters, digits, '_', '.', '-').")],
    public_key: Annotated[
        Path | None, typer.Option("--public-key", help="The site.pub the hospital made and sent (recommended).")
    ] = None,
    generate_key_for_site: Annotated[
        bool,
        typer.Option(
            "--generate-key-for-site",
            help="Make the site's key pair here instead: its private key must then travel to the hospital.",
        ),
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace the site's registered key.")] = False,
) -> None:
    """Register a hospital's node key (its site.pub) and write its bundle folder sites/NAME/ (with the CA
    certificate)."""
    if (public_key is None) == (not generate_key_for_site):
        err_console.print(
            "error: give the hospital's public key with --public-key site.pub (the hospital makes it with "
            "`fedmusk certs site-key`), or --generate-key-for-site to make its private key here"
            if public_key is None
            else "error: --public-key and --generate-key-for-site exclude each other",
            markup=False, highlight=False, soft_wrap=True,
        )  # fmt: skip
        raise typer.Exit(2)
    site = _run(certs.add_site, dir, name, public_key=public_key, overwrite=force)
    ca = _run(cert_files.load_certificate, certs.CertPaths(dir).ca_cert)
    _say(f"registered site {name}: key fingerprint {site.fingerprint}")
    _say(f"bundle: {site.folder}")
    if site.private_key is not None:
        _say(
            f"The bundle holds the site's private key: send the whole folder {site.folder} to the hospital over a "
            f"secure channel (not e-mail) and delete {site.private_key.name} here once it has arrived."
        )
        _say(f"The hospital then runs: fedmusk client SITE_FOLDER --name {name} --superlink COORDINATOR_HOST:PORT "
             "--ca ca.crt --key site.key")
    else:
        _say(f"The hospital keeps its own site.key: send it only {site.folder / 'ca.crt'}.")
    _say(f"The hospital checks ca.crt against this SHA-256 fingerprint: {cert_files.certificate_fingerprint(ca)}")
    _say("`fedmusk server --certs ...` registers this key with its SuperLink at its next start.")


@app.command("site-key")
def site_key(
    out_dir: Annotated[Path, typer.Argument(help="Folder on this hospital's machine for site.key and site.pub.")],
    name: Annotated[str, typer.Option("--name", help="This site's name, as the coordinator registers it.")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing key pair.")] = False,
) -> None:
    """For a hospital: make this site's node key pair; only the public half goes to the coordinator."""
    site = _run(certs.site_key_pair, out_dir, name, overwrite=force)
    _say(f"wrote {site.private_key} (private, mode 0600) and {site.public_key}")
    _say(f"key fingerprint {site.fingerprint}")
    _say("send site.pub to your coordinator; site.key never leaves this machine")


@app.command("renew-server")
def renew_server(dir: CertDir, host: Hosts = None, days: Days = 825) -> None:
    """Issue a new SuperLink certificate and key with the existing CA (keeps its names, adds each --host)."""
    paths = _run(certs.renew_server_cert, dir, hosts=host or [], days=days)
    server = _run(cert_files.load_certificate, paths.server_cert)
    _say(f"wrote {paths.server_cert} and {paths.server_key}; the previous ones are kept as .bak")
    _say(f"valid until {server.not_valid_after_utc:%Y-%m-%d} for {', '.join(cert_files.subject_alt_names(server))}")
    _say("Restart the SuperLink to use it; hospitals need nothing new (the CA is unchanged).")


@app.command()
def show(dir: CertDir) -> None:
    """Show the CA, the SuperLink certificate and the registered sites with their key fingerprints."""
    paths = certs.CertPaths(dir)
    ca = _run(cert_files.load_certificate, paths.ca_cert)
    table = Table(title=f"certificates in {dir}")
    for column in ("role", "subject / names", "valid until"):
        table.add_column(column, overflow="fold")
    table.add_row("CA", ca.subject.rfc4514_string(), f"{ca.not_valid_after_utc:%Y-%m-%d}")
    if paths.server_cert.exists():
        server = _run(cert_files.load_certificate, paths.server_cert)
        names = ", ".join(cert_files.subject_alt_names(server))
        table.add_row("SuperLink", names, f"{server.not_valid_after_utc:%Y-%m-%d}")
    console.print(table)
    _say(f"CA fingerprint (SHA-256): {cert_files.certificate_fingerprint(ca)}")
    try:
        certs.check_server_files(dir)
        _say("SuperLink files: ok")
    except cert_files.CertError as err:
        _say(f"SuperLink files: {err}")
    sites = Table(title="sites")
    sites.add_column("site")
    sites.add_column("key fingerprint", overflow="fold")
    sites.add_column("private key here")
    for name, pub in certs.site_public_keys(dir).items():
        fingerprint = _run(cert_files.fingerprint, pub.read_bytes())
        sites.add_row(name, fingerprint, "yes" if (pub.parent / "site.key").exists() else "no")
    console.print(sites)
