"""The fedmusk command as users meet it: useful output, one-line errors, no tracebacks for their mistakes."""

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from fedmusk.cli import app

runner = CliRunner()


def test_embed_scores_each_image_against_each_text(tmp_path):
    path = tmp_path / "tile.png"
    Image.fromarray(np.full((120, 100, 3), 200, np.uint8)).save(path)
    result = runner.invoke(app, ["embed", str(path), "-t", "tumour", "-t", "stroma"])
    assert result.exit_code == 0, result.output
    assert "tile.png" in result.output


def test_missing_image_is_a_one_line_error(tmp_path):
    result = runner.invoke(app, ["embed", str(tmp_path / "absent.png"), "-t", "tumour"])
    assert result.exit_code == 2
    assert "image not found" in result.output and "Traceback" not in result.output


def test_embed_scores_a_real_tissue_image(tmp_path):
    from skimage import data

    path = tmp_path / "ihc.png"
    Image.fromarray(data.immunohistochemistry()).save(path)  # a real IHC-stained section shipped by scikit-image
    result = runner.invoke(app, ["embed", str(path), "-t", "tumour cells", "-t", "benign stroma"])
    assert result.exit_code == 0, result.output
    assert "image-text similarity" in result.output and "ihc.png" in result.output


def test_unknown_override_key_is_named_without_traceback():
    result = runner.invoke(app, ["demo", "model.presett=large"])
    assert result.exit_code == 2
    assert "unknown configuration key 'model.presett'" in result.output
    assert "Traceback" not in result.output


def test_large_model_without_weights_is_refused_with_the_reason(tmp_path):
    result = runner.invoke(app, ["demo", "--workdir", str(tmp_path), "model.preset=large"])
    assert result.exit_code == 2
    assert "needs the released checkpoint" in result.output
    assert not any(tmp_path.iterdir()), "nothing is started before the configuration is known to work"


def test_demo_runs_the_federation_and_both_baselines_on_a_cohort(small_cohort, tmp_path):
    import shutil

    shutil.copytree(small_cohort[0].parent, tmp_path / "cohort")  # the demo makes its cohort only when absent
    result = runner.invoke(
        app, ["demo", "--workdir", str(tmp_path), "federation.rounds=1", "train.epochs=1", "train.bootstrap=10"]
    )
    assert result.exit_code == 0, result.output
    for row in ("federated", "centralized (pooled)", "site-1 alone", "site-3 alone"):
        assert row in result.output
    assert "mlflow ui --backend-store-uri" in result.output
