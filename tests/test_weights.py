"""Strict, honest loading of MUSK checkpoints."""

import pytest
import torch
from safetensors.torch import save_file

from fedmusk.musk_model import MuskConfig, MuskModel, WeightsMismatchError, create_model, load_musk_weights


@pytest.fixture(scope="module")
def tiny_state():
    torch.manual_seed(0)
    return {k: v.clone() for k, v in MuskModel(MuskConfig.tiny()).state_dict().items()}


def _same(model, state):
    got = model.state_dict()
    return set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state)


@pytest.mark.parametrize("suffix", [".safetensors", ".bin", ".pth"])
def test_checkpoint_files_round_trip_exactly(tmp_path, tiny_state, suffix):
    path = tmp_path / f"model{suffix}"
    if suffix == ".safetensors":
        save_file(tiny_state, str(path))
    else:
        torch.save({"model": tiny_state}, path)
    assert _same(create_model("tiny", weights=path), tiny_state)


@pytest.mark.parametrize("wrapper", ["model", "module"])
def test_state_dict_nested_under_wrapper_key_loads(tiny_state, wrapper):
    model = MuskModel(MuskConfig.tiny())
    load_musk_weights(model, {wrapper: tiny_state})
    assert _same(model, tiny_state)


def test_strict_load_names_every_missing_unexpected_and_misshapen_tensor(tiny_state):
    state = dict(tiny_state)
    del state["logit_scale"]
    del state["beit3.encoder.layers.1.ffn.B.fc2.bias"]
    state["beit3.encoder.layers.7.ffn.A.fc1.weight"] = torch.zeros(2, 2)
    state["vision_head.weight"] = torch.zeros(3, 64)
    model = MuskModel(MuskConfig.tiny())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsMismatchError) as info:
        load_musk_weights(model, state)
    message = str(info.value)
    for name in ("logit_scale", "beit3.encoder.layers.1.ffn.B.fc2.bias", "beit3.encoder.layers.7.ffn.A.fc1.weight"):
        assert name in message
    assert "vision_head.weight: model (64, 64), checkpoint (3, 64)" in message
    assert info.value.missing == ["beit3.encoder.layers.1.ffn.B.fc2.bias", "logit_scale"]
    assert _same(model, before), "a failed strict load must leave the model untouched"


def test_non_strict_load_reports_what_it_skipped(tiny_state):
    state = dict(tiny_state)
    del state["logit_scale"]
    state["extra.weight"] = torch.zeros(1)
    report = load_musk_weights(MuskModel(MuskConfig.tiny()), state, strict=False)
    assert report.missing == ["logit_scale"] and report.unexpected == ["extra.weight"]


def test_tiny_checkpoint_from_another_config_is_refused(tmp_path):
    state = MuskModel(MuskConfig.tiny(embed_dim=32, ffn_dim=64)).state_dict()
    with pytest.raises(WeightsMismatchError, match="shape of beit3.text_embed.weight"):
        create_model("tiny", weights=state)


def test_vision_positions_interpolate_to_a_new_image_size(tiny_state):
    model = create_model("tiny", weights=tiny_state, img_size=128)  # 6x6 grid -> 8x8 grid
    table = model.state_dict()["beit3.encoder.embed_positions.A.weight"]
    old = tiny_state["beit3.encoder.embed_positions.A.weight"]
    assert table.shape == (3 + 64, 64)
    assert torch.equal(table[:3], old[:3]), "offset rows and CLS row are kept as they are"
    out, _ = model(image=torch.randn(1, 3, 128, 128))
    assert out.shape == (1, 64)


def test_missing_checkpoint_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="MUSK checkpoint not found"):
        create_model("tiny", weights=tmp_path / "absent.safetensors")


def test_large_preset_has_the_release_tensor_count_and_parameters():
    with torch.device("meta"):
        model = MuskModel(MuskConfig.large())
    state = model.state_dict()
    assert len(state) == 974
    assert sum(t.numel() for t in state.values()) == 675_188_737
    assert list(model.buffers()) == []
    assert state["beit3.encoder.embed_positions.A.weight"].shape == (579, 1024)
    assert state["beit3.encoder.embed_positions.B.weight"].shape == (1024, 1024)
    assert state["beit3.vision_embed.proj.weight"].shape == (1024, 3, 16, 16)


def test_release_layout_loads_strictly_onto_a_meta_built_large_model():
    with torch.device("meta"):
        reference = MuskModel(MuskConfig.large())
    # A state dict with the release's names and shapes but small storage: zeros expanded to full shape.
    state = {k: torch.zeros(()).expand(v.shape) for k, v in reference.state_dict().items()}
    with torch.device("meta"):
        model = MuskModel(MuskConfig.large())
    report = load_musk_weights(model, state)
    assert not (report.missing or report.unexpected or report.mismatched)
    assert not any(p.is_meta for p in model.parameters())
