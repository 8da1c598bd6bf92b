"""The reference MUSK encoder: torchscale 0.3.0's BEiT3 built with the release's configuration.

Only the model benchmark and the equivalence tests use this module; the fedmusk package never imports torchscale.
It is imported by putting ``benchmarks/`` on ``sys.path`` and importing ``torchscale_reference`` directly (fairscale
installs a top-level ``benchmarks`` package into site-packages, so ``import benchmarks.…`` would find that one).

torchscale imports two packages at import time:
- ``fairscale`` (for activation checkpointing and FSDP wrappers, both unused here): install the real package with
  ``pip install --no-deps fairscale==0.4.13`` (pure Python, imports cleanly beside torch 2.13).
- ``timm``, only for ``drop_path`` (stochastic depth). timm cannot be imported here because it needs torchvision,
  whose PyPI wheels break beside this torch. When timm is missing, ``load_torchscale`` registers a stand-in module
  for the duration of the torchscale import only and removes it again (see ``_timm_drop_path_stand_in``). The stand-in
  is never called: the reference is built with ``drop_path_rate=0``, for which torchscale creates no DropPath at all.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import sys
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedmusk.musk_model.config import MuskConfig

FAIRSCALE_INSTALL = "pip install --no-deps fairscale==0.4.13"
TORCHSCALE_INSTALL = "pip install --no-deps torchscale==0.3.0"


@dataclass(frozen=True)
class Torchscale:
    """The two torchscale classes the reference needs."""

    BEiT3: type
    EncoderConfig: type


def _stand_in_drop_path(x: Tensor, drop_prob: float = 0.0, training: bool = False) -> Tensor:
    # Stochastic depth is off in the reference (drop_path_rate=0); refuse loudly rather than imitate timm.
    if drop_prob and training:
        raise RuntimeError("the torchscale reference is built without timm; stochastic depth is not available")
    return x


@contextlib.contextmanager
def _timm_drop_path_stand_in():
    """While torchscale is imported, let ``from timm.models.layers import drop_path`` resolve without timm.

    The stand-in modules leave ``sys.modules`` afterwards, so the rest of the process (e.g. a library that asks
    ``importlib.util.find_spec("timm")``) still sees that timm is not installed.
    """
    if importlib.util.find_spec("timm") is not None:
        yield
        return
    names = ("timm", "timm.models", "timm.models.layers")
    stand_ins = {name: types.ModuleType(name) for name in names}
    stand_ins["timm"].models = stand_ins["timm.models"]
    stand_ins["timm.models"].layers = stand_ins["timm.models.layers"]
    stand_ins["timm.models.layers"].drop_path = _stand_in_drop_path
    sys.modules.update(stand_ins)
    try:
        yield
    finally:
        for name in names:
            if sys.modules.get(name) is stand_ins[name]:
                del sys.modules[name]


def load_torchscale() -> Torchscale:
    """torchscale 0.3.0's BEiT3 and EncoderConfig.

    Raises ImportError whose message says which package is missing and the install line that provides it.
    """
    for package, install in (("torchscale", TORCHSCALE_INSTALL), ("fairscale", FAIRSCALE_INSTALL)):
        try:
            importlib.import_module(package)
        except ImportError as error:
            message = f"the torchscale reference needs {package} ({error}); install it with: {install}"
            raise ImportError(message) from error
    with _timm_drop_path_stand_in():
        beit3 = importlib.import_module("torchscale.model.BEiT3")
        config = importlib.import_module("torchscale.architecture.config")
    return Torchscale(BEiT3=beit3.BEiT3, EncoderConfig=config.EncoderConfig)


def encoder_config(cfg: MuskConfig, ts: Torchscale | None = None):
    """The EncoderConfig that MUSK's ``_get_large_config`` builds, with the sizes taken from ``cfg``.

    The release passes img_size, patch_size, vocab_size, multiway, layernorm_embedding, normalize_output,
    no_output_layer, drop_path_rate, the four size fields and checkpoint_activations; every other field keeps
    torchscale's default (pre-LN with sub-LN, gelu, eps 1e-5, no relative positions, no dropout). The text position
    table is torchscale's ``max_source_positions`` (default 1024, the release's value).
    """
    ts = ts or load_torchscale()
    return ts.EncoderConfig(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
        vocab_size=cfg.vocab_size,
        multiway=True,
        layernorm_embedding=False,
        normalize_output=True,
        no_output_layer=True,
        drop_path_rate=0.0,
        encoder_embed_dim=cfg.embed_dim,
        encoder_attention_heads=cfg.num_heads,
        encoder_ffn_embed_dim=cfg.ffn_dim,
        encoder_layers=cfg.depth,
        max_source_positions=cfg.max_text_positions,
        layernorm_eps=cfg.layernorm_eps,
        checkpoint_activations=False,
    )


class ReferenceMusk(nn.Module):
    """torchscale's BEiT3 plus the two contrastive heads and ``logit_scale``, named as in the release.

    ``forward`` follows the release's semantics for single-scale features: the CLS token (position 0) of
    ``encoder_out``, optionally the head, optionally L2-normalised; text goes in with ``text_padding_position``.
    """

    def __init__(self, cfg: MuskConfig, ts: Torchscale | None = None):
        super().__init__()
        ts = ts or load_torchscale()
        self.beit3 = ts.BEiT3(encoder_config(cfg, ts))
        self.vision_head = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=False)
        self.language_head = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encoder_out(self, **beit3_inputs) -> Tensor:
        """``beit3(...)["encoder_out"]``: final hidden states for torchscale's keyword inputs
        (textual_tokens, visual_tokens, text_padding_position, vision_masked_position)."""
        return self.beit3(**beit3_inputs)["encoder_out"]

    def forward(
        self,
        image: Tensor | None = None,
        text: Tensor | None = None,
        padding_mask: Tensor | None = None,
        return_global: bool = True,
        with_head: bool = True,
        out_norm: bool = True,
    ) -> tuple[Tensor | None, Tensor | None]:
        vision = language = None
        if image is not None:
            x = self.encoder_out(visual_tokens=image)
            vision = x[:, 0] if return_global else x
            if with_head:
                vision = self.vision_head(vision)
            if out_norm:
                vision = F.normalize(vision, dim=-1)
        if text is not None:
            x = self.encoder_out(textual_tokens=text, text_padding_position=padding_mask)
            language = x[:, 0] if return_global else x
            if with_head:
                language = self.language_head(language)
            if out_norm:
                language = F.normalize(language, dim=-1)
        return vision, language


def reference_like(model: nn.Module, cfg: MuskConfig, ts: Torchscale | None = None) -> ReferenceMusk:
    """A ReferenceMusk holding exactly ``model``'s tensors (strict load: the names must match one to one)."""
    ref = ReferenceMusk(cfg, ts)
    ref.load_state_dict(model.state_dict(), strict=True)
    return ref.to(next(model.parameters()).dtype)
