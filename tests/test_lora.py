"""LoRA adapters on MUSK: what they wrap, what leaves a site, and that adapters survive every round trip."""

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn

from fedmusk.musk_model import MuskConfig, MuskModel
from fedmusk.musk_model.heads import GatedAttentionMIL
from fedmusk.musk_model.lora import (
    AdapterStateError,
    LoraSettings,
    adapter_state,
    apply_lora,
    attach_task_heads,
    load_adapter,
    load_adapter_state,
    merge_for_inference,
    save_adapter,
    task_heads,
    trainable_parameter_count,
)

CFG = MuskConfig.tiny()




@pytest.fixture(scope="module")
def base_state():
    torch.manual_seed(0)
    return MuskModel(CFG).state_dict()


def base_model(state) -> MuskModel:
    model = MuskModel(CFG)
    model.load_state_dict(state)
    return model


def inputs():
    g = torch.Generator().manual_seed(1)
    image = torch.randn(2, 3, CFG.img_size, CFG.img_size, generator=g)
    text = torch.randint(4, 500, (2, 12), generator=g)
    text[:, 0], text[0, 9], text[0, 10:] = 0, 2, 1
    return image, text, text == 1


def outputs(model):
    image, text, pad = inputs()
    with torch.no_grad():
        return model.encode_joint(image, text, pad)


def perturb_adapter(model, seed=3):
    """Stand-in for training: random values in every trainable adapter tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def expected_targets(model, settings):
    """Names of the Linear layers the settings must wrap, derived from the module tree, not from a regex."""
    names = set()
    for name, module in model.named_modules():
        parts = name.split(".")
        if not isinstance(module, nn.Linear) or parts[:3] != ["beit3", "encoder", "layers"]:
            continue
        if parts[4] == "self_attn" and parts[5] in settings.targets and parts[6] in settings.experts:
            names.add(name)
        if parts[4] == "ffn" and parts[5] in settings.experts and parts[6] in settings.targets:
            names.add(name)
    return names


@pytest.mark.parametrize(
    "settings",
    [
        LoraSettings(),
        LoraSettings(targets=("fc1", "fc2"), experts=("A",)),
        LoraSettings(targets=("q_proj", "v_proj", "fc2"), experts=("B",)),
    ],
    ids=["attention-both-experts", "ffn-vision-only", "mixed-language-only"],
)
def test_lora_wraps_exactly_the_chosen_experts_linear_layers(base_state, settings):
    expected = expected_targets(base_model(base_state), settings)
    model = apply_lora(base_model(base_state), settings)
    wrapped = {name.removeprefix("base_model.model.") for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert wrapped == expected
    assert len(expected) == CFG.depth * len(settings.targets) * len(settings.experts)


def test_base_weights_are_frozen_and_only_adapters_train(base_state):
    settings = LoraSettings(rank=4, targets=("q_proj", "fc1"), experts=("A",))
    model = apply_lora(base_model(base_state), settings)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    d, f = CFG.embed_dim, CFG.ffn_dim
    per_layer = 4 * (d + d) + 4 * (d + f)  # q_proj: A (4, d) + B (d, 4); fc1: A (4, d) + B (f, 4)
    assert trainable_parameter_count(model) == CFG.depth * per_layer


def test_fresh_lora_model_equals_base_model(base_state):
    reference = outputs(base_model(base_state))
    settings = LoraSettings(targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"))
    model = apply_lora(base_model(base_state), settings)
    assert torch.equal(outputs(model), reference)


def test_adapter_state_holds_only_adapter_and_head_tensors_in_float32(base_state):
    base_names = set(base_state)
    mil = GatedAttentionMIL(CFG.embed_dim, hidden=16)
    model = apply_lora(base_model(base_state), LoraSettings(), {"mil": mil})
    model.to(torch.bfloat16)
    state = adapter_state(model)
    assert state and not set(state) & base_names
    assert all(".lora_A." in n or ".lora_B." in n or n.startswith("task_heads.mil.") for n in state)
    assert {n.removeprefix("task_heads.mil.") for n in state if n.startswith("task_heads.")} == set(mil.state_dict())
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" and not t.requires_grad for t in state.values())
    lora = [n for n in state if ".lora_" in n]
    assert len(lora) == 2 * CFG.depth * 4 * 2  # A and B x layers x 4 projections x 2 experts


def test_adapter_state_round_trips_bit_exactly_into_a_fresh_model(base_state):
    heads = lambda: {"mil": GatedAttentionMIL(CFG.embed_dim, hidden=16)}  # noqa: E731
    trained = apply_lora(base_model(base_state), LoraSettings(), heads())
    perturb_adapter(trained)
    state = adapter_state(trained)
    fresh = apply_lora(base_model(base_state), LoraSettings(seed=7), heads())
    assert not torch.equal(outputs(fresh), outputs(trained))
    load_adapter_state(fresh, state)
    got = adapter_state(fresh)
    assert set(got) == set(state) and all(torch.equal(got[n], state[n]) for n in state)
    assert torch.equal(outputs(fresh), outputs(trained))


def test_load_adapter_state_refuses_unknown_names_and_wrong_shapes_naming_them(base_state):
    model = apply_lora(base_model(base_state), LoraSettings())
    state = adapter_state(model)
    name = next(n for n in state if ".lora_B." in n)
    bad = dict(state)
    bad["beit3.text_embed.weight"] = torch.zeros(3)
    bad[name] = torch.zeros(5, 5)
    with pytest.raises(AdapterStateError, match=r"beit3\.text_embed\.weight") as err:
        load_adapter_state(model, bad)
    assert name in str(err.value)
    partial = dict(state)
    del partial[name]
    with pytest.raises(AdapterStateError, match="missing"):
        load_adapter_state(model, partial)
    load_adapter_state(model, partial, strict=False)


@pytest.mark.parametrize("ffa", [False, True], ids=["lora", "ffa-lora"])
def test_saved_adapter_with_heads_reloads_with_stock_peft(base_state, tmp_path, ffa):
    settings = LoraSettings(ffa=ffa)
    model = apply_lora(base_model(base_state), settings, {"mil": GatedAttentionMIL(CFG.embed_dim, hidden=16)})
    perturb_adapter(model)
    save_adapter(model, tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in tmp_path.iterdir()}

    base = attach_task_heads(base_model(base_state), {"mil": GatedAttentionMIL(CFG.embed_dim, hidden=16)})
    stock = PeftModel.from_pretrained(base, str(tmp_path))
    want, got = adapter_state(model, trainable_only=False), adapter_state(stock, trainable_only=False)
    assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)
    assert torch.equal(outputs(stock), outputs(model))
    tiles = torch.randn(1, 5, CFG.embed_dim)
    assert torch.equal(task_heads(stock)["mil"](tiles)[0], task_heads(model)["mil"](tiles)[0])


def test_adapter_folder_reloads_strictly_with_ffa_lora_a_still_frozen(base_state, tmp_path):
    model = apply_lora(base_model(base_state), LoraSettings(ffa=True, seed=5))
    perturb_adapter(model)
    save_adapter(model, tmp_path)
    loaded = load_adapter(base_model(base_state), tmp_path)
    want, got = adapter_state(model, trainable_only=False), adapter_state(loaded, trainable_only=False)
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert not any(".lora_A." in n for n, _ in loaded.named_parameters())

    with_head = apply_lora(base_model(base_state), LoraSettings(), {"mil": GatedAttentionMIL(CFG.embed_dim)})
    save_adapter(with_head, tmp_path / "with_head")
    with pytest.raises(AdapterStateError, match="mil"):
        load_adapter(base_model(base_state), tmp_path / "with_head")


def test_ffa_lora_a_is_identical_across_sites_and_never_trains(base_state):
    settings = LoraSettings(ffa=True, seed=11)
    torch.manual_seed(100)
    site1 = apply_lora(base_model(base_state), settings)
    torch.manual_seed(200)
    site2 = apply_lora(base_model(base_state), settings)
    a1, a2 = adapter_state(site1, trainable_only=False), adapter_state(site2, trainable_only=False)
    lora_a = [n for n in a1 if ".lora_A." in n]
    assert lora_a and all(torch.equal(a1[n], a2[n]) for n in lora_a)
    other = adapter_state(apply_lora(base_model(base_state), LoraSettings(ffa=True, seed=12)), trainable_only=False)
    assert not torch.equal(a1[lora_a[0]], other[lora_a[0]])

    sent = adapter_state(site1)
    assert sent and all(".lora_B." in n for n in sent) and all(t.abs().sum() == 0 for t in sent.values())

    image, text, pad = inputs()
    with site1.disable_adapter():  # peft re-enables grads on adapter parameters when adapters come back on
        site1.encode(image=image)
    site1.set_adapter("default")
    opt = torch.optim.AdamW([p for p in site1.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.05)
    for _ in range(3):
        loss = site1.encode_joint(image, text, pad).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = adapter_state(site1, trainable_only=False)
    assert all(torch.equal(after[n], a1[n]) for n in lora_a)
    assert any(not torch.equal(after[n], a1[n]) for n in sent)
    assert set(adapter_state(site1)) == set(sent)


def test_plain_lora_starts_identically_on_every_site(base_state):
    torch.manual_seed(1)
    s1 = adapter_state(apply_lora(base_model(base_state), LoraSettings(seed=3)))
    torch.manual_seed(2)
    s2 = adapter_state(apply_lora(base_model(base_state), LoraSettings(seed=3)))
    assert all(torch.equal(s1[n], s2[n]) for n in s1)


def test_heads_train_through_task_heads_and_are_exchanged(base_state):
    model = apply_lora(base_model(base_state), LoraSettings(), {"mil": GatedAttentionMIL(CFG.embed_dim, hidden=8)})
    before = adapter_state(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    image, _, _ = inputs()
    embedding, _ = task_heads(model)["mil"](model.encode(image=image))
    embedding.pow(2).sum().backward()
    opt.step()
    after = adapter_state(model)
    assert any(not torch.equal(after[n], before[n]) for n in after if n.startswith("task_heads.mil."))


def test_merged_model_matches_the_adapter(base_state):
    model = apply_lora(base_model(base_state), LoraSettings(targets=("q_proj", "fc1")))
    perturb_adapter(model)
    expected = outputs(model)
    merged = merge_for_inference(model)
    assert isinstance(merged, MuskModel)
    torch.testing.assert_close(outputs(merged), expected, rtol=1e-4, atol=1e-5)
