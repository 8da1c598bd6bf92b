"""MUSK in plain torch: a BEiT-3 style multiway transformer with a vision expert (A) and a language expert (B).

Module and parameter names reproduce the released checkpoint exactly (``beit3.encoder.layers.0.self_attn.q_proj.A
.weight`` ...), so its state dict loads with no renaming. Routing: in a sequence of ``split`` vision tokens followed
by text tokens, every token-wise layer (Linear, LayerNorm) uses expert A for the vision tokens and expert B for the
text tokens, while self-attention spans the whole sequence.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fedmusk.musk_model.config import MuskConfig

# fairseq convention kept by the release: position tables start at row 2.
POSITION_OFFSET = 2


class Multiway(nn.Module):
    """Two experts of the same shape: ``A`` for the leading ``split`` (vision) tokens, ``B`` for the rest (text)."""

    def __init__(self, A: nn.Module, B: nn.Module):
        super().__init__()
        self.A = A
        self.B = B

    @classmethod
    def twice(cls, make: Callable[[], nn.Module]) -> Multiway:
        """Two independently initialised copies of ``make()``."""
        return cls(make(), make())

    def forward(self, x: Tensor, split: int) -> Tensor:  # x: (batch, tokens, ...)
        if split >= x.shape[1]:
            return self.A(x)
        if split <= 0:
            return self.B(x)
        return torch.cat([self.A(x[:, :split]), self.B(x[:, split:])], dim=1)


class FeedForward(nn.Module):
    """fc1 -> GELU -> LayerNorm over the hidden units ("sub-LN") -> fc2."""

    def __init__(self, cfg: MuskConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.ffn_dim)
        self.ffn_layernorm = nn.LayerNorm(cfg.ffn_dim, eps=cfg.layernorm_eps)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        h = F.gelu(h.float()).type_as(h)  # exact (erf) GELU, computed in fp32 as the release does
        return self.fc2(self.ffn_layernorm(h))


class MultiwayAttention(nn.Module):
    """Multi-head self-attention whose projections and inner LayerNorm are multiway."""

    def __init__(self, cfg: MuskConfig):
        super().__init__()
        dim, eps = cfg.embed_dim, cfg.layernorm_eps
        self.num_heads = cfg.num_heads
        self.q_proj = Multiway.twice(lambda: nn.Linear(dim, dim))
        self.k_proj = Multiway.twice(lambda: nn.Linear(dim, dim))
        self.v_proj = Multiway.twice(lambda: nn.Linear(dim, dim))
        self.inner_attn_ln = Multiway.twice(lambda: nn.LayerNorm(dim, eps=eps))
        self.out_proj = Multiway.twice(lambda: nn.Linear(dim, dim))

    def forward(self, x: Tensor, split: int, keep: Tensor | None) -> Tensor:
        """``keep``: (batch, 1, 1, tokens) booleans, False for padded keys; None when nothing is padded."""
        b, n, d = x.shape
        heads = lambda t: t.view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)  # (b, h, n, hd)
        q, k, v = (heads(proj(x, split)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # softmax(q k^T / sqrt(hd)) v
        a = a.transpose(1, 2).reshape(b, n, d)
        return self.out_proj(self.inner_attn_ln(a, split), split)


class MultiwayBlock(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + ffn(LN(x)), every LN and Linear multiway."""

    def __init__(self, cfg: MuskConfig):
        super().__init__()
        eps = cfg.layernorm_eps
        self.self_attn_layer_norm = Multiway.twice(lambda: nn.LayerNorm(cfg.embed_dim, eps=eps))
        self.self_attn = MultiwayAttention(cfg)
        self.final_layer_norm = Multiway.twice(lambda: nn.LayerNorm(cfg.embed_dim, eps=eps))
        self.ffn = Multiway.twice(lambda: FeedForward(cfg))

    def forward(self, x: Tensor, split: int, keep: Tensor | None) -> Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x, split), split, keep)
        return x + self.ffn(self.final_layer_norm(x, split), split)


class VisionEmbedding(nn.Module):
    """16x16 patches by a strided convolution, a CLS token in front; masked patches replaced by ``mask_token``."""

    def __init__(self, cfg: MuskConfig):
        super().__init__()
        self.img_size = cfg.img_size
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))

    def forward(self, image: Tensor, masked: Tensor | None = None) -> Tensor:
        """image (b, 3, H, W), masked (b, patches) booleans -> (b, 1 + patches, dim)."""
        if image.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"image is {tuple(image.shape[-2:])} pixels but the model expects {self.img_size}x{self.img_size}"
            )
        x = self.proj(image).flatten(2).transpose(1, 2)
        if masked is not None:
            w = masked.unsqueeze(-1).type_as(x)
            x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        return torch.cat([self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)


class Encoder(nn.Module):
    def __init__(self, cfg: MuskConfig):
        super().__init__()
        vision_rows = cfg.num_vision_tokens + POSITION_OFFSET
        self.embed_positions = Multiway(
            nn.Embedding(vision_rows, cfg.embed_dim), nn.Embedding(cfg.max_text_positions, cfg.embed_dim)
        )
        self.layers = nn.ModuleList(MultiwayBlock(cfg) for _ in range(cfg.depth))
        self.layer_norm = Multiway.twice(lambda: nn.LayerNorm(cfg.embed_dim, eps=cfg.layernorm_eps))


class BEiT3(nn.Module):
    """Container whose attribute names give the release's ``beit3.*`` tensor names."""

    def __init__(self, cfg: MuskConfig):
        super().__init__()
        self.text_embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.vision_embed = VisionEmbedding(cfg)
        self.encoder = Encoder(cfg)


class MuskModel(nn.Module):
    """The MUSK vision-language encoder with its two contrastive heads.

    ``model(image, text, padding_mask)`` gives the reference's (vision, language) features; ``encode`` and
    ``encode_joint`` give final hidden states for training objectives.
    """

    def __init__(self, config: MuskConfig | None = None):
        super().__init__()
        self.config = config or MuskConfig.large()
        cfg = self.config
        self.beit3 = BEiT3(cfg)
        self.vision_head = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=False)
        self.language_head = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.activation_checkpointing = cfg.activation_checkpointing
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """BEiT-3's initialisation: truncated normal (std 0.02) weights, zero biases, unit LayerNorms."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.beit3.vision_embed.cls_token, std=0.02)
        nn.init.trunc_normal_(self.beit3.vision_embed.mask_token, std=0.02)
        self.logit_scale.fill_(math.log(1 / 0.07))

    # -- hidden states ---------------------------------------------------------------------------------------------

    def encode(
        self,
        image: Tensor | None = None,
        text: Tensor | None = None,
        padding_mask: Tensor | None = None,
        image_mask: Tensor | None = None,
    ) -> Tensor:
        """Final hidden states (after the encoder's last LayerNorm) of image tokens, text tokens, or both.

        image: (b, 3, H, W) normalised pixels; text: (b, T) token ids; padding_mask: (b, T), 1 or True at padding;
        image_mask: (b, patches), True where a patch is replaced by the mask token (masked image modelling).
        Returns (b, 1 + patches, dim), (b, T, dim) or, with both, (b, 1 + patches + T, dim).
        """
        if image is None and text is None:
            raise ValueError("encode needs an image, a text or both")
        pos = self.beit3.encoder.embed_positions
        parts, pad = [], None
        if image is not None:
            v = self.beit3.vision_embed(image, image_mask)
            parts.append(v + pos.A.weight[POSITION_OFFSET : POSITION_OFFSET + v.shape[1]].to(v.dtype))
        if text is not None:
            t = self._embed_text(text)
            parts.append(t)
            if padding_mask is not None:
                pad = padding_mask.bool()
                if image is not None:
                    pad = torch.cat([pad.new_zeros(pad.shape[0], parts[0].shape[1]), pad], dim=1)
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        split = parts[0].shape[1] if image is not None else 0
        keep = None
        if pad is not None:
            x = x * (~pad).unsqueeze(-1).to(x.dtype)  # padded positions start from zero, as in the release
            keep = (~pad)[:, None, None, :]
        for layer in self.beit3.encoder.layers:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, split, keep, use_reentrant=False)
            else:
                x = layer(x, split, keep)
        return self.beit3.encoder.layer_norm(x, split)

    def _embed_text(self, text: Tensor) -> Tensor:
        n = text.shape[1]
        if n + POSITION_OFFSET > self.config.max_text_positions:
            raise ValueError(
                f"text has {n} tokens but the model holds at most {self.config.max_text_positions - POSITION_OFFSET}"
            )
        t = self.beit3.text_embed(text)
        return t + self.beit3.encoder.embed_positions.B.weight[POSITION_OFFSET : POSITION_OFFSET + n].to(t.dtype)

    def encode_joint(self, image: Tensor, text: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Hidden states of the joint sequence [vision tokens, text tokens]: (b, 1 + patches + T, dim)."""
        return self.encode(image=image, text=text, padding_mask=padding_mask)

    def multiscale_features(self, image: Tensor, scales: Sequence[int] = (1, 2)) -> Tensor:
        """Raw CLS features at several scales, concatenated: (b, dim * len(scales)).

        Scale s upsamples the image bicubically to s times its size (fp32, no antialias) and cuts it into s x s
        tiles of the model's size; that scale's feature is the mean CLS of its tiles.
        """
        b, c, h, w = image.shape
        feats = []
        for s in scales:
            x = image
            if s != 1:
                x = F.interpolate(image.float(), size=(h * s, w * s), mode="bicubic", align_corners=False)
                x = x.to(image.dtype)
                # (b, c, s*h, s*w) -> (b * s * s, c, h, w), tiles of one image adjacent
                x = x.view(b, c, s, h, s, w).permute(0, 2, 4, 1, 3, 5).reshape(b * s * s, c, h, w)
            cls = self.encode(image=x)[:, 0]
            feats.append(cls.view(b, s * s, -1).mean(dim=1))
        return torch.cat(feats, dim=-1)

    # -- reference interface ---------------------------------------------------------------------------------------

    def forward(
        self,
        image: Tensor | None = None,
        text: Tensor | None = None,
        padding_mask: Tensor | None = None,
        return_global: bool = True,
        with_head: bool = True,
        out_norm: bool = True,
        ms_aug: bool = False,
        scales: Sequence[int] = (1, 2),
    ) -> tuple[Tensor | None, Tensor | None]:
        """(vision, language) features with the release's semantics; either is None when its input is None.

        return_global: CLS token only (b, dim) instead of every token (b, tokens, dim).
        with_head: apply ``vision_head`` / ``language_head``; out_norm: L2-normalise the last dimension.
        ms_aug: multi-scale vision features (b, 2 * dim) from ``multiscale_features``; with the head, the head is
        applied to the first ``dim`` values (the 1x scale) only, as the release does, giving (b, dim).
        """
        vision = language = None
        if image is not None:
            if ms_aug:
                if not return_global:
                    raise ValueError("ms_aug gives global (CLS) features only; call it with return_global=True")
                vision = self.multiscale_features(image, scales)
                if with_head:
                    vision = self.vision_head(vision[:, : self.config.embed_dim])
            else:
                hidden = self.encode(image=image)
                vision = hidden[:, 0] if return_global else hidden
                if with_head:
                    vision = self.vision_head(vision)
            if out_norm:
                vision = F.normalize(vision, dim=-1)
        if text is not None:
            hidden = self.encode(text=text, padding_mask=padding_mask)
            language = hidden[:, 0] if return_global else hidden
            if with_head:
                language = self.language_head(language)
            if out_norm:
                language = F.normalize(language, dim=-1)
        return vision, language

    def set_activation_checkpointing(self, enabled: bool = True) -> MuskModel:
        """Trade compute for memory in training: recompute each block in the backward pass."""
        self.activation_checkpointing = enabled
        return self
