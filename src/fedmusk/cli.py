"""The ``fedmusk`` command: one entry point for hospital IT, coordinators and researchers."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    name="fedmusk",
    help="Federated fine-tuning of the MUSK pathology foundation model across hospitals.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

Overrides = Annotated[list[str] | None, typer.Argument(help="Configuration overrides as key=value, e.g. seed=3")]
ConfigFiles = Annotated[
    list[Path] | None, typer.Option("--config", "-c", help="YAML configuration file(s); later files win.")
]


def _fail(message: str, code: int = 2) -> None:
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(message)}")  # messages quote lists: [a, b] is not markup
    raise typer.Exit(code)


def _user_errors():
    """Errors that are the user's to fix: printed in one line, no traceback."""
    from fedmusk.config import ConfigError
    from fedmusk.musk_model.weights import WeightsMismatchError
    from fedmusk.ops.cert_files import CertError
    from fedmusk.ops.coordinator import CoordinatorError
    from fedmusk.ops.daemon import DaemonError
    from fedmusk.training.bundle import ModelMismatchError

    errors: tuple[type[BaseException], ...] = (
        ConfigError, WeightsMismatchError, FileNotFoundError, CertError, CoordinatorError, DaemonError,
        PermissionError,
        ModelMismatchError,
    )  # fmt: skip
    try:
        from fedmusk.data.errors import SiteDataError

        errors += (SiteDataError,)
    except ImportError:  # pragma: no cover - the data package is always installed with fedmusk
        pass
    return errors


def _run(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except _user_errors() as err:
        _fail(str(err))


@app.command()
def embed(
    images: Annotated[list[Path], typer.Argument(help="Image files (tiles, JPEG/PNG/TIFF).")],
    text: Annotated[list[str], typer.Option("--text", "-t", help="A candidate text; repeat for several.")],
    config: ConfigFiles = None,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", "-s", help="Configuration override key=value; repeat for several.")
    ] = None,
) -> None:
    """Score images against texts with MUSK's contrastive heads (zero-shot classification)."""
    from fedmusk.demo import print_similarity_table, similarity_for_files

    cfg = _run(_load, config, overrides)
    sims, probs = _run(similarity_for_files, cfg, images, text)
    print_similarity_table(console, [p.name for p in images], text, sims, probs)


@app.command()
def demo(
    config: ConfigFiles = None,
    overrides: Overrides = None,
    workdir: Annotated[
        Path, typer.Option(help="Where the cohort (made once) and each run's results go.")
    ] = Path("runs/demo"),
    tracking_uri: TrackingUri = None,
    experiment: Experiment = None,
) -> None:
    """Run the federated story on the embedded default: 3 synthetic hospitals, tiny MUSK, SecAgg+, baselines."""
    from fedmusk.demo import run_demo

    cfg = _run(_load, config or [_default_config("demo.yaml")], _with_tracking(overrides, tracking_uri, experiment))
    _run(run_demo, cfg, console, workdir)


SiteRoots = Annotated[list[Path], typer.Option("--site", help="A site folder holding manifest.csv; repeat for several.")]
TrackingUri = Annotated[
    str | None, typer.Option("--tracking-uri", help="MLflow store or server (tracking.uri) [a store in the run folder].")
]
Experiment = Annotated[str | None, typer.Option("--experiment", help="MLflow experiment name (tracking.experiment).")]
ConfigFile = Annotated[Path, typer.Argument(help="YAML configuration (see configs/).")]


def _with_tracking(overrides: list[str] | None, uri: str | None, experiment: str | None) -> list[str]:
    """``--tracking-uri`` and ``--experiment`` as the configuration overrides they stand for."""
    extra = ([f"tracking.uri={uri}"] if uri else []) + ([f"tracking.experiment={experiment}"] if experiment else [])
    return [*(overrides or []), *extra]


def _run_on_sites(fn, config: Path, overrides: list[str] | None, uri: str | None, experiment: str | None, *args):
    """What ``train`` and ``simulate`` share: load ``config`` with the overrides and tracking options, then return
    ``fn(cfg, *args)``; a user error in either step is one line and exit 2."""
    cfg = _run(_load, [config], _with_tracking(overrides, uri, experiment))
    return _run(fn, cfg, *args)


@app.command()
def validate(
    site_root: Annotated[Path, typer.Argument(help="The site folder holding manifest.csv.")],
    quick: Annotated[bool, typer.Option("--quick", help="Check headers only; do not read every slide.")] = False,
) -> None:
    """Check a site's manifest, slides, reports and pretrain/ folder; exit 1 when anything must be fixed."""
    from fedmusk.data.site.validate import run_validate

    raise typer.Exit(run_validate(site_root, console, check_slides=not quick))


@app.command()
def synth(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the synthetic cohort into.")],
    sites: Annotated[int, typer.Option(help="Number of hospitals.")] = 3,
    cases_per_site: Annotated[
        list[int] | None, typer.Option("--cases-per-site", help="Cases per site; repeat to give each site its own.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed writes the same files.")] = 0,
    slide_px: Annotated[int, typer.Option(help="Longest slide side in pixels at 0.5 um/px.")] = 1024,
    tile_px: Annotated[int, typer.Option(help="Side of the pretraining tiles in pixels.")] = 96,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier synthetic cohort in OUT_DIR.")] = False,
) -> None:
    """Write a synthetic multi-hospital cohort (DICOM WSI and SVS slides, reports, outcomes) for demos and tests."""
    from fedmusk.data.synth.cohort import synthesize_cohort

    counts = None if not cases_per_site else (cases_per_site[0] if len(cases_per_site) == 1 else tuple(cases_per_site))
    roots = _run_synth(
        synthesize_cohort, out_dir, sites=sites, cases_per_site=counts, seed=seed, tile_px=tile_px,
        slide_px=slide_px, overwrite=overwrite,
    )
    for root in roots:
        console.print(f"wrote site {root}")


@app.command()
def train(
    config: ConfigFile,
    site: SiteRoots,
    out: Annotated[Path, typer.Option("--out", help="Output folder for metrics.json, plots, adapter, MLflow store.")],
    overrides: Overrides = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an earlier run in --out.")] = False,
    tracking_uri: TrackingUri = None,
    experiment: Experiment = None,
) -> None:
    """Train on one site (local baseline) or several pooled (centralized baseline); write metrics and plots."""
    from fedmusk.training.run import run_train

    result = _run_on_sites(run_train, config, overrides, tracking_uri, experiment, site, out, err_console, force)
    test = result["test"]
    if test is None:
        console.print(f"test: none ({result['test_note']}); adapter and metrics in {out}")
        return
    console.print(
        f"test: C-index {_num(test.get('c_index'))}, AUROC {_num(test.get('auc'))} "
        f"(n = {test.get('n', 0)}); metrics in {out / 'metrics.json'}"
    )


@app.command()
def prepare(
    site_root: Annotated[Path, typer.Argument(help="The site folder holding manifest.csv.")],
    overrides: Overrides = None,
    config: ConfigFiles = None,
    tiles_only: Annotated[
        bool, typer.Option("--tiles-only", help="Cut tiles and record their coordinates; do not embed them.")
    ] = False,
    quick: Annotated[
        bool, typer.Option("--quick", help="Check slide headers only first; damaged slides are found while preparing.")
    ] = False,
) -> None:
    """Validate a site, cut its slides into tissue tiles and cache frozen-MUSK tile features inside the site.

    Resumable: slides whose cache is current are skipped; a damaged slide is reported and the others go on."""
    from fedmusk.data.prepare.cli import run_prepare

    cfg = _run(_load, config, overrides)
    raise typer.Exit(_run(run_prepare, site_root, cfg, console, embed=not tiles_only, check_slides=not quick))


@app.command()
def audit(
    site_root: Annotated[Path, typer.Argument(help="The site folder (or the audit log file itself).")],
    head: Annotated[
        str | None, typer.Option("--head", help="A head hash noted earlier: check that the log still holds it.")
    ] = None,
) -> None:
    """Show what this site has sent to coordinators, round by round, and whether the log's hash chain is intact.

    Exits 1 when the chain is broken, the last line does not match the stored (or given) head, or the log is
    missing or empty."""
    from fedmusk.client.audit import inspect_log

    table, ok = _run(inspect_log, site_root, head)
    console.print(table)
    raise typer.Exit(0 if ok else 1)


def _run_synth(fn, *args, **kwargs):
    try:
        return _run(fn, *args, **kwargs)
    except (ValueError, FileExistsError) as err:  # impossible arguments, or a folder that is not ours to replace
        _fail(str(err))


@app.command()
def simulate(
    config: ConfigFile,
    site: SiteRoots,
    out: Annotated[Path, typer.Option("--out", help="Output folder: summary.json, checkpoints, MLflow store, adapter.")],
    overrides: Overrides = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last completed round in --out.")] = False,
    tracking_uri: TrackingUri = None,
    experiment: Experiment = None,
) -> None:
    """Run a federation on this machine: one simulated hospital per site folder, Flower's simulation engine."""
    from fedmusk.federation import run_simulation_from_config
    from fedmusk.server.rounds import RoundFailed

    try:
        summary = _run_on_sites(
            run_simulation_from_config, config, overrides, tracking_uri, experiment, site, out, resume, console
        )
    except RoundFailed as err:
        _fail(f"the federation stopped: {err}", code=1)
    pooled = summary["test"]["pooled"]
    console.print(
        f"{summary['rounds_completed']} rounds, {summary['strategy']}, secure aggregation "
        f"{'on' if summary['secure_aggregation'] else 'off'}; test C-index {_num(pooled.get('c_index'))}, "
        f"AUROC {_num(pooled.get('auc'))}; summary in {out / 'summary.json'}; registered model "
        f"{summary.get('registered_model')}; open MLflow with: mlflow ui --backend-store-uri {summary['tracking_uri']}"
    )


@app.command()
def server(
    config: Annotated[Path, typer.Argument(help="The federation's YAML configuration (see configs/).")],
    overrides: Overrides = None,
    certs: Annotated[
        Path | None, typer.Option(envvar="FEDMUSK_CERTS", help="Certificate folder from `fedmusk certs init`.")
    ] = None,
    state: Annotated[
        Path, typer.Option(envvar="FEDMUSK_STATE", help="SuperLink database, logs and Flower's files.")
    ] = Path("fedmusk-coordinator"),
    out: Annotated[
        Path | None,
        typer.Option(envvar="FEDMUSK_OUT", help="Checkpoints, rounds, MLflow store, final adapter [STATE/federation]."),
    ] = None,
    host: Annotated[
        str, typer.Option(envvar="FEDMUSK_HOST", help="Address to serve on; 0.0.0.0 to serve other machines.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="FEDMUSK_PORT", help="The HTTPS port hospitals connect to.")] = 9092,
    superlink_port: Annotated[
        int | None,
        typer.Option(
            envvar="FEDMUSK_SUPERLINK_PORT", help="The SuperLink's own port, on 127.0.0.1 only [a free port]."
        ),
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the federation in --out from its last round.")] = False,
    dev_insecure: Annotated[
        bool, typer.Option("--dev-insecure", help="Development only: no TLS, no node authentication, loopback only.")
    ] = False,
    tracking_uri: TrackingUri = None,
    experiment: Experiment = None,
) -> None:
    """Coordinator: start a SuperLink (TLS, site authentication) behind a proxy that publishes only its Fleet API,
    run the federation, show its rounds."""
    from fedmusk.ops.coordinator import CoordinatorSettings, RoundFailed, run_coordinator

    settings = CoordinatorSettings(
        [config], _with_tracking(overrides, tracking_uri, experiment), certs=certs, state=state, out=out, host=host,
        port=port, superlink_port=superlink_port, resume=resume, insecure=dev_insecure,
    )  # fmt: skip
    try:
        summary = _run(run_coordinator, settings, console)
    except RoundFailed as err:
        _fail(f"the federation stopped: {err}", code=1)
    except KeyboardInterrupt:
        _fail("stopped; continue the federation with the same command and --resume", code=130)
    console.print(f"{summary['rounds_completed']} rounds completed; final adapter in {summary['adapter']}")


@app.command()
def client(
    site_root: Annotated[Path, typer.Argument(envvar="FEDMUSK_SITE", help="The site folder holding manifest.csv.")],
    name: Annotated[str, typer.Option(envvar="FEDMUSK_SITE_NAME", help="This site's registered name.")],
    superlink: Annotated[str, typer.Option(envvar="FEDMUSK_SUPERLINK", help="The coordinator's HOST:PORT.")],
    ca: Annotated[
        Path | None, typer.Option(envvar="FEDMUSK_CA", help="The federation's CA certificate (ca.crt).")
    ] = None,
    key: Annotated[
        Path | None, typer.Option(envvar="FEDMUSK_KEY", help="This site's private key (site.key, mode 600).")
    ] = None,
    policy: Annotated[
        Path | None,
        typer.Option(envvar="FEDMUSK_POLICY", help="The site's egress policy [SITE_ROOT/site-policy.yaml or default]."),
    ] = None,
    settings_file: Annotated[
        Path | None,
        typer.Option(
            "--settings", envvar="FEDMUSK_SETTINGS",
            help="This site's own settings: model files, device, batch sizes [SITE_ROOT/site-settings.yaml].",
        ),
    ] = None,
    runtime_port: Annotated[
        int,
        typer.Option(envvar="FEDMUSK_RUNTIME_PORT", help="Local port (127.0.0.1) between the SuperNode and the worker."),
    ] = 9094,
    log_file: Annotated[
        Path | None, typer.Option(envvar="FEDMUSK_LOG_FILE", help="Local log [SITE_ROOT/.fedmusk/logs/client.log].")
    ] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Check slide headers only at start.")] = False,
    registration_wait: Annotated[
        float,
        typer.Option(
            envvar="FEDMUSK_REGISTRATION_WAIT", help="Seconds to keep trying while the coordinator refuses the key."
        ),
    ] = 180.0,
    dev_insecure: Annotated[
        bool, typer.Option("--dev-insecure", help="Development only: no TLS, no node authentication, loopback only.")
    ] = False,
) -> None:
    """Hospital daemon: check the site, then run its SuperNode (TLS, site key) and the site worker until stopped."""
    from fedmusk.ops.daemon import DaemonSettings, run_daemon

    settings = DaemonSettings(
        site_root, name, superlink, ca=ca, key=key, policy=policy, runtime_port=runtime_port, log_file=log_file,
        quick=quick, registration_wait_s=registration_wait, insecure=dev_insecure, settings=settings_file,
    )  # fmt: skip
    raise typer.Exit(_run(run_daemon, settings, console))


SiteArg = Annotated[Path, typer.Argument(help="The site folder holding manifest.csv.")]
ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="An adapter folder, a run's output folder, or models:/NAME/VERSION.")
]
Sets = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="This site's settings for the model, e.g. model.weights=PATH; repeat for several."),
]
Split = Annotated[str, typer.Option("--split", help="Cases to use: all, or the model's train/val/test split.")]
Reprepare = Annotated[
    bool, typer.Option("--reprepare", help="Embed slides again when the site's cache was made for another model.")
]


@app.command()
def predict(
    site_root: SiteArg,
    model: ModelOpt,
    split: Split = "all",
    manifest: Annotated[
        Path | None, typer.Option("--manifest", help="A CSV of new cases (case_id, slide, report; no outcomes).")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="CSV to write [SITE/fedmusk-results/predict-...].")] = None,
    sets: Sets = None,
    reprepare: Reprepare = False,
) -> None:
    """Apply a trained model to this site's cases: risk score (or response probability) and risk group per case,
    written inside the site. Nothing leaves the site."""
    from fedmusk.training.predict import run_predict

    path, table = _run(
        run_predict, site_root, model, list(sets or []), split, manifest, out, reprepare, err_console
    )  # fmt: skip
    console.print(f"{len(table.rows)} cases scored; predictions in {path}")


@app.command()
def evaluate(
    site_root: SiteArg,
    model: ModelOpt,
    against: Annotated[
        list[str] | None, typer.Option("--against", help="Another model to compare on the same cases; repeat.")
    ] = None,
    split: Split = "all",
    out: Annotated[
        Path | None, typer.Option("--out", help="Report folder [SITE/fedmusk-results/evaluate-...].")
    ] = None,
    sets: Sets = None,
    reprepare: Reprepare = False,
) -> None:
    """External validation on this site's cases with outcomes: metrics with bootstrap CIs, Kaplan-Meier by risk
    group with the log-rank test, calibration, paired comparisons; a report (markdown + PNGs) inside the site."""
    from fedmusk.training.evaluate import HEADLINE, run_evaluate

    report = _run(
        run_evaluate, site_root, model, list(against or []), list(sets or []), split, out, reprepare, err_console
    )  # fmt: skip
    key, label = HEADLINE[report["task"]]
    ci = report["metrics"].get(f"{key}_ci")
    ci_text = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci and None not in ci else ""
    value = _num(report["metrics"].get(key))
    console.print(f"{label} {value}{ci_text} on {report['n']} cases; report in {report['report']}")


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _load(files, overrides):
    from fedmusk.config import load_config

    return load_config(files or [], overrides or [])


def _default_config(name: str) -> Path:
    """A config shipped in the repository's configs/ (next to src/) or installed beside the package."""
    for base in (Path(__file__).resolve().parents[2] / "configs", Path(sys.prefix) / "share" / "fedmusk" / "configs"):
        if (base / name).is_file():
            return base / name
    _fail(f"default configuration {name} not found; pass --config")
    raise AssertionError  # unreachable


def _mount_subcommands() -> None:
    from fedmusk.ops.certs_cli import app as certs_app

    app.add_typer(certs_app, name="certs", help="Certificates and site keys for a TLS federation.")


_mount_subcommands()

if __name__ == "__main__":
    app()
