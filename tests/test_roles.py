"""One rule names every tensor: LoRA factor A or B, task head, multiway expert, base weight."""

import re

import pytest

from fedmusk.musk_model.lora import LoraSettings
from fedmusk.musk_model.roles import expert, is_base_weight, is_lora, is_task_head, lora_factor, lora_partner

LANGUAGE_A = "beit3.encoder.layers.0.self_attn.q_proj.B.lora_A.weight"
VISION_FFN_B = "beit3.encoder.layers.3.ffn.A.fc2.lora_B.weight"
HEAD = "task_heads.fusion.gate.weight"
BASE = "beit3.encoder.layers.0.self_attn.q_proj.A.weight"


def test_the_factor_comes_from_the_lora_component_not_the_expert_letter():
    assert lora_factor(LANGUAGE_A) == "A" and expert(LANGUAGE_A) == "B"
    assert lora_factor(VISION_FFN_B) == "B" and expert(VISION_FFN_B) == "A"
    assert lora_factor(BASE) is None and expert(BASE) == "A"
    assert lora_factor(HEAD) is None and expert(HEAD) is None


def test_peft_names_count_only_for_their_own_adapter():
    peft_name = "base_model.model.beit3.encoder.layers.0.self_attn.q_proj.B.lora_A.default.weight"
    assert lora_factor(peft_name) == "A" and lora_factor(peft_name, "default") == "A"
    assert lora_factor(peft_name, "other") is None


def test_every_name_is_exactly_one_of_lora_head_or_base():
    for name in (LANGUAGE_A, VISION_FFN_B, HEAD, BASE):
        assert [is_lora(name), is_task_head(name), is_base_weight(name)].count(True) == 1, name
    with pytest.raises(ValueError, match="names both lora_A and lora_B"):
        lora_factor("x.lora_A.lora_B.weight")


def test_a_factor_pairs_with_the_b_factor_of_its_layer():
    layer, partner = lora_partner(LANGUAGE_A)
    assert layer == "beit3.encoder.layers.0.self_attn.q_proj.B"
    assert partner == "beit3.encoder.layers.0.self_attn.q_proj.B.lora_B.weight"


def test_lora_targets_only_the_chosen_experts_linears():
    pattern = LoraSettings(targets=("q_proj", "fc1"), experts=("B",)).target_regex()
    assert re.fullmatch(pattern, "beit3.encoder.layers.2.self_attn.q_proj.B")
    assert re.fullmatch(pattern, "beit3.encoder.layers.2.ffn.B.fc1")
    assert not re.fullmatch(pattern, "beit3.encoder.layers.2.self_attn.q_proj.A")
    assert not re.fullmatch(pattern, "beit3.encoder.layers.2.ffn.B.fc2")
