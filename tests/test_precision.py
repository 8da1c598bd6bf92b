"""``model.precision``: what auto resolves to, the bf16 forward against float32, and which LoRA experts an
outcome model trains (those that can receive a gradient)."""

import logging

import pytest
import torch

from fedmusk.config import ConfigError, learnable_experts, load_config
from fedmusk.musk_model import MuskConfig, MuskModel
from fedmusk.precision import autocast, bf16_native, resolve_precision
from fedmusk.runtime import load_model, load_tokenizer, model_precision
from fedmusk.training.outcome import OutcomeTrainer


def test_auto_precision_is_bf16_only_where_the_hardware_has_it():
    assert resolve_precision("float32", "cpu") == "float32"
    assert resolve_precision("bfloat16", "cpu") == "bfloat16"
    assert resolve_precision("auto", "cpu") == ("bfloat16" if bf16_native("cpu") else "float32")
    assert resolve_precision("auto", "meta") == "float32"
    assert model_precision(load_config([], ["model.precision=bfloat16"]).model, "cpu") == "bfloat16"
    with pytest.raises(ConfigError, match=r"'model.precision': Invalid value 'half', expected one of \[auto, float32"):
        load_config([], ["model.precision=half"])  # a choice of the schema: refused at load
    with pytest.raises(ConfigError, match="model.precision='half'"):
        resolve_precision("half", "cpu")


def test_bf16_cls_features_of_the_tiny_model_stay_within_cosine_0999_of_float32():
    torch.manual_seed(0)
    model = MuskModel(MuskConfig.tiny()).eval()
    images = torch.randn(8, 3, model.config.img_size, model.config.img_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fp32, _ = model(image=images, with_head=False, out_norm=False)
        with autocast("cpu", "bfloat16"):
            bf16, _ = model(image=images, with_head=False, out_norm=False)
    assert bf16.dtype == torch.bfloat16  # autocast really ran the products in bf16
    cosine = torch.nn.functional.cosine_similarity(bf16.float(), fp32, dim=-1)
    assert float(cosine.min()) >= 0.999, float(cosine.min())


def trainer(*overrides):
    cfg = load_config([], ["device=cpu", *overrides])
    return OutcomeTrainer(cfg, load_model(cfg.model, "cpu", 0), load_tokenizer(cfg.model), None, "cpu")


def test_vision_lora_on_cached_features_is_neither_trained_nor_exchanged_and_the_log_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="fedmusk.training.outcome"):
        cached = trainer("train.features=cached", "train.lora.experts=[A,B]", "seed=11")
    state = cached.adapter_state()
    assert state and not [n for n in state if ".A.lora_" in n]  # the vision expert's LoRA is not in the adapter
    assert [n for n in state if ".B.lora_" in n]
    assert not [n for n, p in cached.model.named_parameters() if p.requires_grad and ".A.lora_" in n]
    assert any("vision expert (A) is neither trained nor exchanged" in r.message for r in caplog.records)

    end2end = trainer("train.features=end2end", "train.lora.experts=[A,B]").adapter_state()
    assert [n for n in end2end if ".A.lora_" in n] and [n for n in end2end if ".B.lora_" in n]


def test_learnable_experts_follow_features_and_fusion():
    def experts(*overrides):
        return learnable_experts(load_config([], ["train.lora.experts=[A,B]", *overrides]))[0]

    assert experts("train.features=cached", "train.fusion=concat") == ("B",)
    assert experts("train.features=end2end", "train.fusion=gated") == ("A", "B")
    assert experts("train.features=end2end", "train.fusion=report") == ("B",)
    assert experts("train.features=end2end", "train.fusion=image") == ("A",)
    with pytest.raises(ConfigError, match="no LoRA expert can learn"):
        trainer("train.features=cached", "train.fusion=image")
