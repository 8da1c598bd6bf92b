"""MuskModel computes what the reference (torchscale 0.3.0's BEiT3 with MUSK's configuration) computes.

Both models hold the same random tensors; every parameter, LayerNorms and biases included, is perturbed away from
its initial value so that a swapped expert, a missing bias or a misplaced LayerNorm changes the output.
"""

import sys
from pathlib import Path

import pytest
import torch

from fedmusk.musk_model import MuskConfig, MuskModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import torchscale_reference  # noqa: E402

try:
    TORCHSCALE = torchscale_reference.load_torchscale()
except ImportError as error:
    pytest.skip(f"torchscale reference unavailable: {error}", allow_module_level=True)

ATOL = 1e-4
CONFIGS = {
    "tiny": MuskConfig.tiny(),
    "mid": MuskConfig.tiny(embed_dim=128, depth=4, num_heads=4, ffn_dim=512, img_size=64),
}


def _perturbed(model: MuskModel, seed: int) -> MuskModel:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model.eval()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request):
    """(config, MuskModel, reference) holding identical random tensors."""
    cfg = CONFIGS[request.param]
    torch.manual_seed(0)
    model = _perturbed(MuskModel(cfg), seed=1)
    reference = torchscale_reference.reference_like(model, cfg, TORCHSCALE).eval()
    return cfg, model, reference


def _images(cfg, n=3, seed=2):
    return torch.randn(n, 3, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(seed))


def _texts(n=3, length=24, seed=3):
    """Token ids framed like the tokenizer's (<s> ... </s>, then pads) with a different length in every row."""
    ids = torch.randint(4, 64000, (n, length), generator=torch.Generator().manual_seed(seed))
    padding = torch.zeros(n, length, dtype=torch.bool)
    for row, used in enumerate(torch.linspace(length, 5, n).long().tolist()):
        ids[row, 0], ids[row, used - 1] = 0, 2
        ids[row, used:] = 1
        padding[row, used:] = True
    return ids, padding


def _assert_close(got, want):
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < ATOL


def test_state_dict_names_and_shapes_equal_the_reference_at_the_release_size():
    with torch.device("meta"):
        ours = MuskModel(MuskConfig.large()).state_dict()
        theirs = torchscale_reference.ReferenceMusk(MuskConfig.large(), TORCHSCALE).state_dict()
    assert len(ours) == 974
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


@pytest.mark.parametrize("with_head", [True, False])
@pytest.mark.parametrize("out_norm", [True, False])
@torch.no_grad()
def test_image_cls_features_match_the_reference(pair, with_head, out_norm):
    cfg, model, reference = pair
    image = _images(cfg)
    ours, _ = model(image=image, with_head=with_head, out_norm=out_norm)
    theirs, _ = reference(image=image, with_head=with_head, out_norm=out_norm)
    _assert_close(ours, theirs)


@pytest.mark.parametrize("with_head", [True, False])
@pytest.mark.parametrize("out_norm", [True, False])
@torch.no_grad()
def test_padded_text_cls_features_match_the_reference(pair, with_head, out_norm):
    _, model, reference = pair
    text, padding = _texts()
    _, ours = model(text=text, padding_mask=padding, with_head=with_head, out_norm=out_norm)
    _, theirs = reference(text=text, padding_mask=padding, with_head=with_head, out_norm=out_norm)
    _assert_close(ours, theirs)


@torch.no_grad()
def test_every_image_and_text_token_matches_the_reference(pair):
    cfg, model, reference = pair
    image, (text, padding) = _images(cfg), _texts()
    kwargs = dict(image=image, text=text, padding_mask=padding, return_global=False, with_head=False, out_norm=False)
    ours, theirs = model(**kwargs), reference(**kwargs)
    assert ours[0].shape == (3, cfg.num_vision_tokens, cfg.embed_dim)
    _assert_close(ours[0], theirs[0])
    _assert_close(ours[1], theirs[1])


@torch.no_grad()
def test_unpadded_text_matches_the_reference(pair):
    _, model, reference = pair
    text, _ = _texts(length=16)
    _assert_close(model.encode(text=text), reference.encoder_out(textual_tokens=text))


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
@torch.no_grad()
def test_joint_image_text_encoding_matches_the_reference(pair, padded):
    cfg, model, reference = pair
    image, (text, padding) = _images(cfg), _texts()
    padding = padding if padded else None
    ours = model.encode_joint(image, text, padding)
    theirs = reference.encoder_out(visual_tokens=image, textual_tokens=text, text_padding_position=padding)
    assert ours.shape == (3, cfg.num_vision_tokens + text.shape[1], cfg.embed_dim)
    _assert_close(ours, theirs)


@torch.no_grad()
def test_masked_image_modelling_input_matches_the_reference(pair):
    cfg, model, reference = pair
    image = _images(cfg)
    masked = torch.rand(3, cfg.num_patches, generator=torch.Generator().manual_seed(4)) < 0.4
    ours = model.encode(image=image, image_mask=masked)
    theirs = reference.encoder_out(visual_tokens=image, vision_masked_position=masked)
    _assert_close(ours, theirs)
    # the mask must matter, or this test would pass with image_mask ignored
    assert (ours - model.encode(image=image)).abs().max().item() > 100 * ATOL
