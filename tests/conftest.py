"""Shared test set-up: one thread for torch (tiny models run faster without thread hand-offs, and the suite stays
fast on a shared 2-core machine), Flower and Ray kept local and quiet, MLflow kept offline."""

import os

import pytest
import torch

os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def report_cohorts(tmp_path_factory):
    """Two independent synthetic cohorts of labels and reports only (no slides): (development, external)."""
    from fedmusk.data.synth.cohort import synthesize_cohort

    root = tmp_path_factory.mktemp("report-cohorts")
    dev = synthesize_cohort(root / "dev", sites=3, cases_per_site=100, seed=1, images=False, progress=False)
    ext = synthesize_cohort(root / "ext", sites=3, cases_per_site=100, seed=2, images=False, progress=False)
    return dev, ext


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory):
    """A small 3-site cohort with real slide files (DICOM and SVS-like TIFF), reports and pretraining data."""
    from fedmusk.data.synth.cohort import synthesize_cohort

    root = tmp_path_factory.mktemp("small-cohort")
    return synthesize_cohort(
        root, sites=3, cases_per_site=10, seed=0, slide_px=384, pretrain_tiles=8, pretrain_reports=6, progress=False
    )
