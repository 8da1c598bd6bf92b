"""Behaviour of MuskModel that follows from the release's semantics, checked without the reference."""

import copy

import pytest
import torch
import torch.nn.functional as F

from fedmusk.musk_model import MuskConfig, MuskModel

CFG = MuskConfig.tiny()
DIM = CFG.embed_dim


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = MuskModel(CFG)
    # Move every tensor off its initial value (unit LayerNorms, zero biases) so that each one affects the output.
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def _images(n=2, seed=0, size=CFG.img_size):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _text(max_len, words=13, n=2, seed=0):
    """``n`` texts of ``words`` pieces framed as the tokenizer frames them, right-padded with id 1 to ``max_len``."""
    pieces = torch.randint(4, 64000, (n, words), generator=torch.Generator().manual_seed(seed))
    ids = torch.ones(n, max_len, dtype=torch.long)
    ids[:, 0], ids[:, 1 : words + 1], ids[:, words + 1] = 0, pieces, 2
    return ids, ids == 1


@torch.no_grad()
def test_text_features_do_not_depend_on_how_much_padding_follows(model):
    short, long = _text(max_len=20), _text(max_len=40)
    for kwargs in (dict(with_head=False, out_norm=False), dict(with_head=True, out_norm=True)):
        _, a = model(text=short[0], padding_mask=short[1], **kwargs)
        _, b = model(text=long[0], padding_mask=long[1], **kwargs)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    used = 15  # <s> + 13 pieces + </s>
    a = model.encode(text=short[0], padding_mask=short[1])[:, :used]
    b = model.encode(text=long[0], padding_mask=long[1])[:, :used]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@torch.no_grad()
def test_joint_vision_and_text_tokens_attend_to_each_other(model):
    image, split = _images(), CFG.num_vision_tokens
    text_a, pad_a = _text(max_len=20, seed=1)
    text_b, pad_b = _text(max_len=20, seed=2)
    joint_a = model.encode_joint(image, text_a, pad_a)
    joint_b = model.encode_joint(image, text_b, pad_b)
    assert (joint_a[:, :split] - model.encode(image=image)).abs().max() > 1e-2
    assert (joint_a[:, :split] - joint_b[:, :split]).abs().max() > 1e-2
    assert (joint_a[:, split:] - model.encode(text=text_a, padding_mask=pad_a)).abs().max() > 1e-2


@torch.no_grad()
def test_joint_vision_tokens_equal_the_image_only_ones_when_all_text_is_padding(model):
    # With every text key masked, attention of a vision token spans exactly the image-only sequence, so any
    # difference means padded keys leak into attention or the vision tokens are routed or positioned differently.
    image = _images()
    text, _ = _text(max_len=20, seed=1)
    joint = model.encode_joint(image, text, torch.ones_like(text, dtype=torch.bool))
    torch.testing.assert_close(joint[:, : CFG.num_vision_tokens], model.encode(image=image), atol=1e-5, rtol=0)


@torch.no_grad()
def test_multiscale_features_are_plain_cls_then_mean_cls_of_the_upsampled_tiles(model):
    image, size = _images(), CFG.img_size
    features, _ = model(image=image, ms_aug=True, with_head=False, out_norm=False)
    assert features.shape == (2, 2 * DIM)

    plain, _ = model(image=image, with_head=False, out_norm=False)
    torch.testing.assert_close(features[:, :DIM], plain, atol=1e-5, rtol=0)

    upsampled = F.interpolate(image, size=(2 * size, 2 * size), mode="bicubic", align_corners=False)
    tiles = [upsampled[:, :, r : r + size, c : c + size] for r in (0, size) for c in (0, size)]
    tile_cls = torch.stack([model(image=t, with_head=False, out_norm=False)[0] for t in tiles]).mean(dim=0)
    torch.testing.assert_close(features[:, DIM:], tile_cls, atol=1e-5, rtol=0)


@torch.no_grad()
def test_multiscale_features_with_head_project_only_the_plain_scale(model):
    image = _images()
    features, _ = model(image=image, ms_aug=True, with_head=True, out_norm=False)
    plain_with_head, _ = model(image=image, with_head=True, out_norm=False)
    assert features.shape == (2, DIM)
    torch.testing.assert_close(features, plain_with_head, atol=1e-5, rtol=0)


@pytest.mark.parametrize("with_head", [True, False])
@pytest.mark.parametrize("ms_aug", [True, False])
@torch.no_grad()
def test_normalised_outputs_have_unit_length(model, with_head, ms_aug):
    text, padding = _text(max_len=20)
    vision, language = model(image=_images(), text=text, padding_mask=padding, with_head=with_head, ms_aug=ms_aug)
    torch.testing.assert_close(vision.norm(dim=-1), torch.ones(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(language.norm(dim=-1), torch.ones(2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("with_head", [True, False])
@torch.no_grad()
def test_token_outputs_keep_one_vector_per_token(model, with_head):
    text, padding = _text(max_len=20)
    vision, language = model(image=_images(), text=text, padding_mask=padding, return_global=False, with_head=with_head)
    assert vision.shape == (2, CFG.num_vision_tokens, DIM)
    assert language.shape == (2, 20, DIM)
    assert model(image=_images(), return_global=True)[0].shape == (2, DIM)
    with pytest.raises(ValueError, match="ms_aug"):
        model(image=_images(), ms_aug=True, return_global=False)


def test_release_preset_has_the_release_tensor_count_and_no_buffers():
    with torch.device("meta"):
        large = MuskModel(MuskConfig.large())
    assert len(large.state_dict()) == 974
    assert sum(p.numel() for p in large.parameters()) == 675_188_737
    assert list(large.buffers()) == []


def _gradients(model, image, text, padding):
    model.zero_grad()
    vision, language = model(image=image, text=text, padding_mask=padding)
    joint = model.encode_joint(image, text, padding)
    loss = (model.logit_scale.exp() * vision @ language.T).logsumexp(dim=1).sum() + joint.square().mean()
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _count_forward_runs(module) -> dict:
    """Counts runs of ``module.forward``; forward hooks would miss the recomputation in the backward pass."""
    runs, forward = {"n": 0}, module.forward

    def counted(*args, **kwargs):
        runs["n"] += 1
        return forward(*args, **kwargs)

    module.forward = counted
    return runs


def test_activation_checkpointing_gives_the_same_gradients(model):
    plain = copy.deepcopy(model).train()
    checkpointed = copy.deepcopy(model).train().set_activation_checkpointing(True)
    plain_runs = _count_forward_runs(plain.beit3.encoder.layers[0])
    checkpointed_runs = _count_forward_runs(checkpointed.beit3.encoder.layers[0])
    text, padding = _text(max_len=20)
    inputs = (_images(), text, padding)

    want, got = _gradients(plain, *inputs), _gradients(checkpointed, *inputs)

    # three forwards (image, text, joint); checkpointing runs each block again in the backward pass
    assert (plain_runs["n"], checkpointed_runs["n"]) == (3, 6)
    unused = {"beit3.vision_embed.mask_token"}  # only masked image modelling reaches it
    assert set(want) == set(got) == {name for name, _ in model.named_parameters()} - unused
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)


@torch.no_grad()
def test_bfloat16_autocast_on_cpu_stays_close_to_float32(model):
    image, (text, padding) = _images(), _text(max_len=20)
    want = model(image=image, text=text, padding_mask=padding)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(image=image, text=text, padding_mask=padding)
    for g, w in zip(got, want, strict=True):
        assert torch.isfinite(g).all()
        assert F.cosine_similarity(g.float(), w, dim=-1).min() > 0.999
        assert (g.float() - w).abs().max() < 0.02
