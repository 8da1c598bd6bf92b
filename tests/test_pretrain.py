"""Continued pretraining: reading a site's pretrain/ folder, the augmentations, MUSK's objectives through LoRA, and
carrying the pretrained LoRA into the outcome model."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.color import rgb2lab
from torch import nn

from fedmusk.config import ConfigError, FedMuskConfig
from fedmusk.data.errors import SiteDataError
from fedmusk.data.synth.cohort import synthesize_cohort
from fedmusk.musk_model.lora import AdapterStateError
from fedmusk.runtime import load_model, load_tokenizer
from fedmusk.training import augment
from fedmusk.training.outcome import OutcomeTrainer
from fedmusk.training.pretrain import PretrainTrainer, carry_lora, lora_only
from fedmusk.training.pretrain_data import read_pretrain_folder, split_document
from fedmusk.training.session import TrainingSession

OBJECTIVES = ("mlm", "mim", "clip")




@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """One synthetic site with 16 captioned 96-pixel tiles and the sentences of 6 reports."""
    out = tmp_path_factory.mktemp("pretrain-cohort")
    (root,) = synthesize_cohort(
        out, sites=1, cases_per_site=2, seed=0, tile_px=96, progress=False, slide_px=256,
        pretrain_tiles=16, pretrain_reports=6, workers=1,
    )  # fmt: skip
    return root


def tiny_cfg(**pretrain) -> FedMuskConfig:
    cfg = FedMuskConfig()
    p = cfg.train.pretrain
    p.steps, p.batch_size, p.lr = 2, 4, 1e-3
    for key, value in pretrain.items():
        setattr(p, key, value)
    return cfg


def only(objective: str, **pretrain) -> FedMuskConfig:
    weights = {f"{o}_weight": float(o == objective) for o in OBJECTIVES}
    return tiny_cfg(**weights, **pretrain)


def trainer(cfg: FedMuskConfig, roots) -> PretrainTrainer:
    return PretrainTrainer(cfg, load_model(cfg.model, "cpu", cfg.seed), load_tokenizer(cfg.model), roots, "cpu")


def copy_pretrain(site: Path, dest: Path, parts=("images", "text", "pairs.csv")) -> Path:
    import shutil

    for part in parts:
        src = site / "pretrain" / part
        if src.is_dir():
            shutil.copytree(src, dest / "pretrain" / part)
        else:
            (dest / "pretrain").mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dest / "pretrain" / part)
    return dest


# -- the pretrain/ folder --------------------------------------------------------------------------------------------


def test_site_folder_gives_tiles_text_segments_and_captioned_pairs(site):
    data = read_pretrain_folder(site)
    assert len(data.images) == 16 and len(data.pairs) == 16
    assert all(p.caption for p in data.pairs)
    assert data.pairs[0].image.name == "pretrain/images/tile-0001.png"
    assert data.images[0].read().shape == (96, 96, 3)
    # every word of every .txt document and .jsonl record is in the segments, in file order
    words = []
    for f in sorted((site / "pretrain" / "text").iterdir()):
        if f.suffix == ".txt":
            words += f.read_text().split()
        else:
            words += [w for line in f.read_text().splitlines() for w in json.loads(line)["text"].split()]
    assert any(f.suffix == ".jsonl" for f in (site / "pretrain" / "text").iterdir())
    assert " ".join(data.texts).split() == words
    assert len(data.texts) > 5


def test_documents_are_packed_into_sentence_segments_that_never_cross_paragraphs():
    text = "Tumour size 3.3 cm. Margins clear.\nNodes negative.\n\nSecond paragraph here. It ends."
    assert split_document(text, max_words=100) == [
        "Tumour size 3.3 cm. Margins clear. Nodes negative.",
        "Second paragraph here. It ends.",
    ]
    assert split_document(text, max_words=4) == [
        "Tumour size 3.3 cm.", "Margins clear. Nodes negative.", "Second paragraph here.", "It ends.",
    ]  # fmt: skip


def test_missing_or_empty_pretrain_folder_is_no_data(tmp_path):
    assert len(read_pretrain_folder(tmp_path)) == 0
    (tmp_path / "pretrain" / "images").mkdir(parents=True)
    (tmp_path / "pretrain" / "text").mkdir()
    assert len(read_pretrain_folder(tmp_path)) == 0


def test_unreadable_image_is_reported_with_its_file(tmp_path):
    images = tmp_path / "pretrain" / "images"
    images.mkdir(parents=True)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (image,) = read_pretrain_folder(tmp_path).images
    with pytest.raises(SiteDataError, match="pretrain/images/broken.png: cannot be read as an image"):
        image.read()


def test_jsonl_line_without_text_is_reported_with_file_and_line(tmp_path):
    text = tmp_path / "pretrain" / "text"
    text.mkdir(parents=True)
    (text / "notes.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(SiteDataError, match=r"pretrain/text/notes.jsonl: line 2 has no \"text\""):
        read_pretrain_folder(tmp_path)
    (text / "notes.jsonl").write_text("not json\n")
    with pytest.raises(SiteDataError, match="notes.jsonl: line 1 is not valid JSON"):
        read_pretrain_folder(tmp_path)


def test_pair_image_outside_the_pretrain_folder_or_missing_is_refused(tmp_path):
    folder = tmp_path / "pretrain"
    folder.mkdir()
    (folder / "pairs.csv").write_text("image,caption\n../../secret.png,a caption\n")
    with pytest.raises(SiteDataError, match="pairs.csv: row 1: image path leads outside the pretrain folder"):
        read_pretrain_folder(tmp_path)
    (folder / "pairs.csv").write_text("image,caption\nimages/gone.png,a caption\nimages/skip.png,\n")
    with pytest.raises(SiteDataError, match="row 1: image pretrain/images/gone.png not found"):
        read_pretrain_folder(tmp_path)
    (folder / "pairs.csv").write_text("picture,caption\n")
    with pytest.raises(SiteDataError, match="required column 'image' is missing"):
        read_pretrain_folder(tmp_path)


# -- augmentation ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tile(site) -> np.ndarray:
    return read_pretrain_folder(site).images[0].read()


def test_augmentation_is_deterministic_per_seed(tile):
    recipe = augment.masked_modelling(96)
    a = recipe(tile, np.random.default_rng(5))
    assert np.array_equal(a, recipe(tile, np.random.default_rng(5)))
    assert not np.array_equal(a, recipe(tile, np.random.default_rng(6)))
    t1, t2 = recipe(tile, torch.Generator().manual_seed(1)), recipe(tile, torch.Generator().manual_seed(1))
    assert np.array_equal(t1, t2)  # a torch generator works too
    pair = augment.alignment(96)
    assert np.array_equal(pair(tile, np.random.default_rng(2)), pair(tile, np.random.default_rng(2)))


def test_stain_augmentation_moves_lab_channel_means_within_their_bounds(tile):
    before = rgb2lab(tile).reshape(-1, 3).mean(axis=0)
    moved = []
    for seed in range(12):
        out = augment.stain_augment(tile, np.random.default_rng(seed))
        assert out.shape == tile.shape and out.dtype == np.uint8
        shift = np.abs(rgb2lab(out).reshape(-1, 3).mean(axis=0) - before)
        bound = augment.TRUNCATE * np.asarray(augment.STAIN_MEAN_SD)
        assert np.all(shift <= bound + 1.0), (seed, shift)  # +1: rounding to uint8 and gamut clipping
        moved.append(np.abs(out.astype(int) - tile).mean())
    assert max(moved) > 1.0  # it does change colours


def test_colour_jitter_keeps_brightness_within_its_strength(tile):
    mean = tile.mean()
    for seed in range(12):
        out = augment.colour_jitter(tile, np.random.default_rng(seed), strength=0.2)
        assert out.shape == tile.shape
        assert 0.6 * mean <= out.mean() <= 1.4 * mean  # brightness x contrast x saturation, each within 0.8-1.2
    assert np.array_equal(augment.colour_jitter(tile, np.random.default_rng(0), strength=0.0), tile)


@pytest.mark.parametrize("scale", [0.5, 1.0, 2.0])
def test_mixed_magnification_views_have_the_model_size(tile, scale):
    rng = np.random.default_rng(0)
    for image in (tile, np.ascontiguousarray(tile[:80, :])):  # square and non-square tiles
        out = augment.magnification_crop(image, rng, out_size=64, scales=(scale,))
        assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    # scale 1 on a square tile of the output size is the tile itself, at some position: unchanged
    if scale == 1.0:
        assert np.array_equal(augment.magnification_crop(tile, rng, 96, scales=(1.0,)), tile)
    full = augment.Augmentation(48)(tile, rng)
    assert full.shape == (48, 48, 3)
    assert augment.random_resized_crop(tile, rng, 40).shape == (40, 40, 3)


# -- training --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_each_objective_alone_lowers_its_loss_on_a_fixed_batch(site, objective):
    # the MLM head is a bias over a tied random embedding: it needs a larger step; CLIP needs more steps to get
    # clearly below chance (log 8) rather than merely to uniform similarities
    steps = 30 if objective == "clip" else 20
    cfg = only(objective, steps=steps, batch_size=8, lr=1e-2 if objective == "mlm" else 1e-3)
    t = trainer(cfg, [site])
    before = t.evaluate("train")
    metrics = t.train_epoch()
    after = t.evaluate("train")
    assert before["n"] == after["n"] == 8
    assert after[objective] < before[objective] - 0.1, (before, after)
    assert math.isfinite(metrics["loss"]) and metrics["cases"] == steps * 8
    others = [o for o in OBJECTIVES if o != objective]
    assert all(math.isnan(metrics[o]) for o in others)
    if objective == "clip":  # below the loss of features that tell nothing apart: it learned, not collapsed
        assert after["clip"] < math.log(8)
        assert after["aux_mlm"] < before["aux_mlm"]


def test_adapter_holds_only_lora_and_the_prediction_heads(site):
    t = trainer(tiny_cfg(), [site])
    metrics = t.train_epoch()
    assert set(metrics) == {"loss", "mlm", "mim", "clip", "aux_mlm", "cases"}
    state = t.adapter_state()
    heads = {n.split(".")[1] for n in state if n.startswith("task_heads.")}
    assert heads == {"mlm", "mim", "aux_decoder", "aux_mlm"}
    assert all(".lora_A." in n or ".lora_B." in n or n.startswith("task_heads.") for n in state)
    assert set(lora_only(state)) == {n for n in state if not n.startswith("task_heads.")}
    # the MLM heads are tied to the frozen text embedding: only their bias is exchanged
    assert [n for n in state if n.startswith("task_heads.mlm.")] == ["task_heads.mlm.bias"]
    assert any(state[n].abs().sum() > 0 for n in state if ".lora_B." in n)  # training moved LoRA


def test_training_and_evaluation_are_deterministic_for_a_seed(site):
    a, b = trainer(tiny_cfg(), [site]), trainer(tiny_cfg(), [site])
    a.train_epoch(), b.train_epoch()
    sa, sb = a.adapter_state(), b.adapter_state()
    assert all(torch.equal(sa[n], sb[n]) for n in sa)
    assert a.evaluate() == a.evaluate()
    # a federated round reseeds the trainer's generator and clears the optimiser: the round then repeats exactly
    rounds = []
    for _ in range(2):
        a.load_adapter_state(sa)
        a.generator.manual_seed(7)
        a.optimizer.state.clear()
        a.train_epoch()
        rounds.append(a.adapter_state())
    assert all(torch.equal(rounds[0][n], rounds[1][n]) for n in sa)


def test_objective_without_data_is_skipped_and_its_heads_still_exchanged(site, tmp_path):
    text_only = copy_pretrain(site, tmp_path / "text-only", parts=("text",))
    t = trainer(tiny_cfg(), [text_only])
    metrics = t.train_epoch()
    assert metrics["cases"] == 2 * 4 and math.isnan(metrics["mim"]) and math.isnan(metrics["clip"])
    full = trainer(tiny_cfg(), [site])
    assert set(t.adapter_state()) == set(full.adapter_state())
    with pytest.raises(SiteDataError, match="no pretraining data for the enabled objectives"):
        trainer(only("mim"), [text_only])


class PatchCodes(nn.Module):
    """A stand-in visual tokenizer: one of 16 codes per 16-pixel patch."""

    def __init__(self):
        super().__init__()
        self.n_codes = 16
        self.proj = nn.Conv2d(3, 16, 16, 16)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2).argmax(-1)


def test_codes_target_without_a_visual_tokenizer_is_a_config_error(site, tmp_path):
    with pytest.raises(ConfigError, match="needs a visual tokenizer"):
        trainer(tiny_cfg(mim_target="codes"), [site])
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ConfigError, match="junk.pt cannot be loaded"):
        trainer(tiny_cfg(mim_target="codes", visual_tokenizer=str(tmp_path / "junk.pt")), [site])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
# torch.export leaves functions patched that TorchScript then cannot compile: script first.
@pytest.mark.parametrize("fmt", ["torchscript", "export"])
def test_mim_predicts_the_codes_of_a_given_visual_tokenizer(site, tmp_path, fmt):
    path = tmp_path / f"codes-{fmt}.pt2"
    if fmt == "export":
        batch = torch.export.Dim("batch", min=1, max=64)
        program = torch.export.export(PatchCodes(), (torch.zeros(2, 3, 96, 96),), dynamic_shapes=({0: batch},))
        torch.export.save(program, str(path))
        n_codes = 8192  # an exported program keeps no plain attributes: MUSK's codebook size
    else:
        torch.jit.save(torch.jit.script(PatchCodes()), str(path))
        n_codes = 16
    t = trainer(only("mim", mim_target="codes", visual_tokenizer=str(path)), [site])
    assert t.adapter_state()["task_heads.mim.linear.weight"].shape == (n_codes, 64)
    assert math.isfinite(t.train_epoch()["mim"]) and math.isfinite(t.evaluate()["mim"])


def test_pretrained_lora_moves_into_an_outcome_trainer_by_name(site):
    pre = trainer(tiny_cfg(), [site])
    pre.train_epoch()
    cfg = tiny_cfg()
    cfg.train.features, cfg.train.fusion = "end2end", "concat"  # both experts learn in the outcome model
    outcome = OutcomeTrainer(cfg, load_model(cfg.model, "cpu", 0), load_tokenizer(cfg.model), None, "cpu")
    own = outcome.adapter_state()
    pretrained = pre.adapter_state()
    assert set(lora_only(own)) == set(lora_only(pretrained))
    outcome.load_adapter_state(carry_lora(pretrained, own))
    after = outcome.adapter_state()
    assert all(torch.equal(after[n], pretrained[n]) for n in lora_only(pretrained))
    assert all(torch.equal(after[n], own[n]) for n in own if n.startswith("task_heads."))
    cfg.train.features = "cached"  # the vision expert cannot learn on cached features: its pretrained LoRA stays
    cached = OutcomeTrainer(cfg, load_model(cfg.model, "cpu", 0), load_tokenizer(cfg.model), None, "cpu")
    carried = carry_lora(pretrained, cached.adapter_state())
    assert set(lora_only(carried)) == {n for n in lora_only(pretrained) if ".B.lora_" in n}
    cfg.train.lora.rank = 4
    other = OutcomeTrainer(cfg, load_model(cfg.model, "cpu", 0), load_tokenizer(cfg.model), None, "cpu")
    with pytest.raises(AdapterStateError, match="other shapes"):
        carry_lora(pretrained, other.adapter_state())


def test_pretraining_session_offers_the_outcome_session_interface(site):
    session = TrainingSession(tiny_cfg(), [site], device="cpu", pretrain=True)
    assert session.num_train_cases > 0
    state = session.adapter_state()
    metrics = session.train(epochs=1, proximal=lambda model: torch.zeros(()))
    assert metrics["cases"] > 0 and math.isfinite(metrics["loss"])
    held_out = session.evaluate("val")
    assert held_out["n"] > 0 and math.isfinite(held_out["loss"])
    session.load_adapter_state(state)
    assert all(torch.equal(session.adapter_state()[n], state[n]) for n in state)
