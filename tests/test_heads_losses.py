"""Masks, training objectives and task heads: statistics of the masks, losses that learn, heads that pool right."""

import math

import pytest
import torch

from fedmusk.musk_model import MuskConfig, MuskModel
from fedmusk.musk_model.heads import (
    CaseFusion,
    GatedAttentionMIL,
    ResponseHead,
    SurvivalHead,
    bins_to_risk,
    discretize_times,
    pack_cases,
    pad_bags,
    survival_curve,
)
from fedmusk.musk_model.lora import LoraSettings, adapter_state, apply_lora, task_heads
from fedmusk.musk_model.losses import (
    CrossAttentionDecoder,
    MimHead,
    MlmHead,
    aux_mlm_loss,
    binary_response_loss,
    clip_loss,
    cox_partial_likelihood,
    discrete_time_nll,
    masked_logits,
    mim_loss,
    mlm_loss,
    teacher_patch_features,
)
from fedmusk.musk_model.masking import block_mask, whole_word_mask

CFG = MuskConfig.tiny(vocab_size=2000)  # test ids stay below 2000; a small embedding keeps the tests fast
MASK_ID = 1999  # the tiny vocabulary's last id plays <mask>
MUSK_MASK_ID, MUSK_VOCAB = 64001, 64010
STEPS = 20




def texts(batch=4, length=24, seed=0):
    """Token ids shaped like MUSK's: <s> pieces </s> pads, with word-start flags on the pieces."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, MASK_ID, (batch, length), generator=g)
    starts = torch.rand(batch, length, generator=g) < 0.6
    for i in range(batch):
        end = length - 1 - (3 * i) % 8
        ids[i, 0], ids[i, end], ids[i, end + 1 :] = 0, 2, 1
    return ids, starts, ids == 1


def mask_text(ids, starts, seed=0, mask_id=MASK_ID, vocab=CFG.vocab_size):
    return whole_word_mask(
        ids, starts, mask_token_id=mask_id, vocab_size=vocab, generator=torch.Generator().manual_seed(seed)
    )


def images(batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, CFG.img_size, CFG.img_size, generator=g)


# -- masks -----------------------------------------------------------------------------------------------------------


def test_whole_word_masking_rates_split_and_specials():
    ids, starts, _ = texts(batch=400, length=64, seed=1)
    gen = torch.Generator().manual_seed(0)
    out, labels = whole_word_mask(ids, starts, mask_token_id=MUSK_MASK_ID, vocab_size=MUSK_VOCAB, generator=gen)
    chosen = labels != -100
    special = (ids == 0) | (ids == 1) | (ids == 2)
    assert not (chosen & special).any() and torch.equal(out[special], ids[special])
    assert torch.equal(labels[chosen], ids[chosen])

    # whole words: a chosen piece's word is chosen entirely
    real = ~special
    word_start = real & (starts | torch.cat([torch.ones_like(real[:, :1]), special[:, :-1]], 1))
    word_id = torch.cumsum(word_start.long(), 1)
    n_words = n_chosen_words = 0
    for i in range(ids.shape[0]):
        for w in word_id[i][real[i]].unique():
            members = chosen[i][real[i] & (word_id[i] == w)]
            assert members.all() or not members.any()
            n_chosen_words += int(members.all())
        n_words += int(word_start[i].sum())
    assert abs(n_chosen_words / n_words - 0.15) < 0.01

    total = chosen.sum().item()
    masked = (out[chosen] == MUSK_MASK_ID).float().mean().item()
    kept = (out[chosen] == ids[chosen]).float().mean().item()
    assert abs(masked - 0.8) < 0.02 and abs(kept - 0.1) < 0.015 and abs(1 - masked - kept - 0.1) < 0.015
    randoms = out[chosen & (out != MUSK_MASK_ID) & (out != ids)]
    assert total > 2000 and (randoms >= 4).all() and (randoms < MUSK_VOCAB).all()


def test_whole_word_masking_is_reproducible_from_the_generator():
    ids, starts, _ = texts()
    a = mask_text(ids, starts, seed=4, mask_id=MUSK_MASK_ID, vocab=MUSK_VOCAB)
    b = mask_text(ids, starts, seed=4, mask_id=MUSK_MASK_ID, vocab=MUSK_VOCAB)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("grid,expected", [(24, 230), (14, 78), (6, 14)])
def test_block_masks_hit_an_exact_count_in_blocks(grid, expected):
    masks = block_mask(64, grid, generator=torch.Generator().manual_seed(0))
    assert masks.shape == (64, grid * grid) and (masks.sum(1) == expected).all()
    # blocks, not salt and pepper: most masked patches have a masked 4-neighbour
    m = masks.view(64, grid, grid).float()
    padded = torch.nn.functional.pad(m, (1, 1, 1, 1))
    neighbours = padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
    assert ((neighbours > 0) & (m > 0)).sum() / m.sum() > 0.9
    # and spread over the image, not always in the same place
    assert m.mean(0).max() < 0.9


# -- objectives learn --------------------------------------------------------------------------------------------------


def train(params, loss_fn, steps=STEPS, lr=3e-3):
    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.fixture
def lora_model():
    torch.manual_seed(0)
    return lambda heads: apply_lora(MuskModel(CFG), LoraSettings(rank=4), heads)


def test_mlm_loss_decreases(lora_model):
    ids, starts, pad = texts()
    masked, labels = mask_text(ids, starts)
    model = lora_model({"mlm": MlmHead(CFG.embed_dim, CFG.vocab_size)})
    head = task_heads(model)["mlm"]
    losses = train(
        model.parameters(), lambda: mlm_loss(*masked_logits(head, model.encode(text=masked, padding_mask=pad), labels))
    )
    assert losses[-1] < 0.5 * losses[0]


def test_tied_mlm_head_trains_only_a_bias_and_reads_the_frozen_embedding():
    torch.manual_seed(0)
    base = MuskModel(CFG)
    head = MlmHead(CFG.embed_dim, CFG.vocab_size, tie_to=base.beit3.text_embed)
    model = apply_lora(base, LoraSettings(rank=4), {"mlm": head})
    live = task_heads(model)["mlm"]
    assert [n for n in adapter_state(model) if n.startswith("task_heads.")] == ["task_heads.mlm.bias"]
    hidden = torch.randn(3, CFG.embed_dim)
    assert torch.equal(live(hidden), hidden @ base.beit3.text_embed.weight.t())


@pytest.mark.parametrize("target_kind", ["teacher", "codes"])
def test_mim_loss_decreases(lora_model, target_kind):
    image = images()
    mask = block_mask(4, CFG.grid_size, generator=torch.Generator().manual_seed(0))
    out_dim = CFG.embed_dim if target_kind == "teacher" else 8192
    model = lora_model({"mim": MimHead(CFG.embed_dim, out_dim)})
    head = task_heads(model)["mim"]
    if target_kind == "teacher":
        target = teacher_patch_features(model, image)
        with torch.no_grad():
            assert torch.equal(target, model.get_base_model().encode(image=image)[:, 1:])
    else:
        target = torch.randint(0, 8192, mask.shape, generator=torch.Generator().manual_seed(1))
    predict = lambda: head(model.encode(image=image, image_mask=mask)[:, 1:])  # noqa: E731
    losses = train(model.parameters(), lambda: mim_loss(predict(), target, mask))
    assert losses[-1] < 0.7 * losses[0]
    if target_kind == "teacher":  # the teacher stays the frozen base even after the adapter trained
        assert torch.equal(teacher_patch_features(model, image), target)


def test_clip_with_auxiliary_mlm_decreases(lora_model):
    image = images()
    ids, starts, pad = texts()
    masked, labels = mask_text(ids, starts)
    heads = {
        "decoder": CrossAttentionDecoder(CFG.embed_dim, CFG.num_heads),
        "mlm": MlmHead(CFG.embed_dim, CFG.vocab_size),
    }
    model = lora_model(heads)
    live = task_heads(model)
    parts = []

    def loss():
        image_hidden = model.encode(image=image)  # one vision pass serves both losses
        _, language = model(text=ids, padding_mask=pad, out_norm=False)
        text_hidden = model.encode(text=masked, padding_mask=pad)
        c = clip_loss(model.vision_head(image_hidden[:, 0]), language, model.logit_scale)
        a = aux_mlm_loss(live["decoder"], live["mlm"], text_hidden, image_hidden, labels)
        parts.append((c.item(), a.item()))
        return c + a

    losses = train(model.parameters(), loss)
    assert losses[-1] < 0.7 * losses[0]
    assert parts[-1][0] < parts[0][0] and parts[-1][1] < parts[0][1]


def test_clip_loss_caps_the_temperature_and_prefers_matched_pairs():
    feats = torch.nn.functional.normalize(torch.randn(6, 16), dim=-1)
    matched = clip_loss(feats, feats, torch.tensor(math.log(1000.0)))
    capped = clip_loss(feats, feats, torch.tensor(math.log(100.0)))
    assert torch.equal(matched, capped)
    assert clip_loss(feats, feats, torch.tensor(2.0)) < clip_loss(feats, feats.roll(1, 0), torch.tensor(2.0))


def test_survival_losses_decrease():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 16, generator=g)
    time = torch.rand(32, generator=g) * 10
    event = torch.rand(32, generator=g) < 0.7
    bins, edges = discretize_times(time, event, n_bins=4)
    torch.manual_seed(0)
    hazard, cox, response = SurvivalHead(16, 4), ResponseHead(16), ResponseHead(16)
    nll = train(hazard.parameters(), lambda: discrete_time_nll(hazard(x), bins, event), lr=3e-2)
    partial = train(cox.parameters(), lambda: cox_partial_likelihood(cox(x), time, event), lr=3e-2)
    bce = train(response.parameters(), lambda: binary_response_loss(response(x), event), lr=3e-2)
    assert nll[-1] < 0.8 * nll[0] and partial[-1] < 0.9 * partial[0] and bce[-1] < 0.8 * bce[0]


# -- survival maths ----------------------------------------------------------------------------------------------------


def test_cox_loss_matches_a_hand_computed_value_with_breslow_ties():
    risk = torch.tensor([0.5, -0.2, 1.0, 0.0])
    time = torch.tensor([2.0, 2.0, 5.0, 1.0])
    event = torch.tensor([1, 1, 0, 0])
    # events at t=2 (cases 0 and 1, tied): Breslow risk set {0, 1, 2} for both
    denominator = math.log(math.exp(0.5) + math.exp(-0.2) + math.exp(1.0))
    expected = -((0.5 - denominator) + (-0.2 - denominator)) / 2
    assert cox_partial_likelihood(risk, time, event).item() == pytest.approx(expected, abs=1e-6)


def test_discrete_time_nll_matches_the_likelihood_by_hand():
    logits = torch.tensor([[0.0, 1.0, -1.0], [0.5, 0.5, 0.5]])
    h = torch.sigmoid(logits)
    # case 0: event in bin 1 -> h1 * (1 - h0); case 1: censored in bin 2 -> (1 - h0)(1 - h1)(1 - h2)
    expected = -(torch.log(h[0, 1] * (1 - h[0, 0])) + torch.log((1 - h[1]).prod())) / 2
    got = discrete_time_nll(logits, torch.tensor([1, 2]), torch.tensor([1, 0]))
    assert got.item() == pytest.approx(expected.item(), abs=1e-6)
    weighted = discrete_time_nll(logits, torch.tensor([1, 2]), torch.tensor([1, 0]), alpha=0.15)
    uncensored = -torch.log(h[0, 1] * (1 - h[0, 0])) / 2
    assert weighted.item() == pytest.approx(0.85 * expected.item() + 0.15 * uncensored.item(), abs=1e-6)


def test_time_bins_risk_and_survival_curves_are_consistent():
    time = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 20.0])
    event = torch.tensor([1, 1, 1, 1, 1, 1, 1, 1, 0])
    bins, edges = discretize_times(time, event, n_bins=4)
    assert edges[0] == 0 and math.isinf(edges[-1]) and bins.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 3]
    held_out, _ = discretize_times(torch.tensor([0.5, 100.0]), torch.tensor([0, 0]), edges=edges)
    assert held_out.tolist() == [0, 3]
    low, high = torch.full((1, 4), -3.0), torch.full((1, 4), 3.0)
    assert bins_to_risk(high) > bins_to_risk(low)
    curve = survival_curve(torch.cat([low, high]), torch.tensor([0.0, 3.0, 50.0]), edges)
    assert curve.shape == (2, 3) and (curve[:, 0] == 1).all() and (curve.diff(dim=1) <= 0).all()
    assert (curve[0] > curve[1])[1:].all()


# -- heads -----------------------------------------------------------------------------------------------------------


def test_abmil_attention_sums_to_one_over_real_tiles_and_ignores_padding():
    torch.manual_seed(0)
    mil = GatedAttentionMIL(16, hidden=8)
    bags = [torch.randn(n, 16) for n in (5, 2, 7)]
    tiles, padding = pad_bags(bags)
    emb, attn = mil(tiles, padding)
    assert emb.shape == (3, 16) and attn.shape == (3, 7)
    assert torch.allclose(attn.sum(1), torch.ones(3)) and (attn[padding] == 0).all()
    noisy = tiles.masked_fill(padding.unsqueeze(-1), 1e3)
    emb2, attn2 = mil(noisy, padding)
    assert torch.equal(emb, emb2) and torch.equal(attn, attn2)
    alone, _ = mil(bags[1].unsqueeze(0))
    torch.testing.assert_close(alone[0], emb[1])
    with pytest.raises(ValueError, match="no tiles"):
        mil(tiles, torch.ones_like(padding))


@pytest.mark.parametrize("mode,out_dim", [("concat", 16), ("gated", 8), ("image", 8), ("report", 8)])
def test_case_fusion_pools_all_slides_of_a_case_and_supports_ablations(mode, out_dim):
    torch.manual_seed(0)
    fusion = CaseFusion(tile_dim=16, report_dim=12, dim=8, mode=mode)
    cases = [[torch.randn(3, 16), torch.randn(4, 16)], [torch.randn(2, 16)]]
    tiles, padding = pack_cases(cases)
    report = torch.randn(2, 12)
    emb, attn = fusion(
        tiles if mode != "report" else None, padding if mode != "report" else None, report if mode != "image" else None
    )
    assert emb.shape == (2, out_dim) and fusion.out_dim == out_dim
    if mode == "report":
        assert attn is None
    else:
        assert attn.shape == (2, 7) and torch.allclose(attn.sum(1), torch.ones(2)) and (attn[1, 2:] == 0).all()
    emb.sum().backward()


def test_case_fusion_refuses_missing_inputs():
    with pytest.raises(ValueError, match="report"):
        CaseFusion(16, 12, mode="gated")(torch.randn(1, 3, 16))
    with pytest.raises(ValueError, match="fusion mode"):
        CaseFusion(16, 12, mode="sum")
