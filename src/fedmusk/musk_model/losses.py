"""Training objectives for MUSK fine-tuning: masked language and image modelling (the paper's stage 1), CLIP with an
auxiliary cross-attention MLM (stage 2), and the outcome losses (discrete-time survival, Cox, binary response).

Prediction heads live here with their losses; attach them to the adapter (``apply_lora(extra_trainable=...)``)
so that they train and are exchanged with it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedmusk.musk_model.masking import IGNORE_INDEX

VISUAL_TOKENIZER_CODES = 8192
AUX_MLM_WEIGHT = 0.1
LOGIT_SCALE_MAX = 100.0


# -- masked language modelling ---------------------------------------------------------------------------------------


class _Shared:
    """Holds a module by reference without registering it, and survives deepcopy as the same object: a tied head
    copied by peft's modules_to_save still reads the model's own (frozen) embedding."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __deepcopy__(self, memo: dict) -> _Shared:
        return self


class MlmHead(nn.Module):
    """Hidden states (..., dim) -> token logits (..., vocab).

    tie_to: the model's text embedding; the output weight is then that (frozen) embedding and only a bias trains,
    which keeps the exchanged adapter small (an untied head for MUSK's 64,010 ids is 65M numbers).
    """

    def __init__(self, dim: int, vocab_size: int, tie_to: nn.Embedding | None = None):
        super().__init__()
        if tie_to is not None:
            if tuple(tie_to.weight.shape) != (vocab_size, dim):
                shape = tuple(tie_to.weight.shape)
                raise ValueError(f"cannot tie a ({vocab_size}, {dim}) head to an embedding of shape {shape}")
            self._tied = _Shared(tie_to)
            self.bias = nn.Parameter(torch.zeros(vocab_size))
        else:
            self._tied = None
            self.linear = nn.Linear(dim, vocab_size)

    def forward(self, hidden: Tensor) -> Tensor:
        if self._tied is None:
            return self.linear(hidden)
        return F.linear(hidden, self._tied.module.weight.to(hidden.dtype), self.bias.to(hidden.dtype))


def mlm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy over the labelled (masked) positions; logits (..., vocab), labels (...) with -100 elsewhere.
    Zero, still differentiable, when nothing is labelled."""
    logits, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    if not (labels != IGNORE_INDEX).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)


def masked_logits(head: nn.Module, hidden: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Run ``head`` only at labelled positions (saves a (b, T, vocab) tensor): (logits (m, vocab), labels (m,))."""
    keep = labels != IGNORE_INDEX
    return head(hidden[keep]), labels[keep]


# -- masked image modelling ------------------------------------------------------------------------------------------


class MimHead(nn.Module):
    """Patch hidden states (..., dim) -> predictions (..., out_dim): teacher features (out_dim = dim, the default)
    or visual-tokenizer code logits (out_dim = 8192)."""

    def __init__(self, dim: int, out_dim: int | None = None):
        super().__init__()
        self.linear = nn.Linear(dim, out_dim or dim)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.linear(hidden)


@torch.no_grad()
def teacher_patch_features(model: nn.Module, image: Tensor) -> Tensor:
    """MIM targets from the frozen base model: its final patch hidden states for the unmasked image, (b, patches, dim),
    computed with the adapters disabled (peft's ``disable_adapter``) and without gradients."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            return model.encode(image=image)[:, 1:].detach()
    return model.encode(image=image)[:, 1:].detach()


def mim_loss(pred: Tensor, target: Tensor, image_mask: Tensor) -> Tensor:
    """Masked image modelling loss over the masked patches only; the target's dtype picks the kind.

    pred (b, patches, out_dim) from ``MimHead`` on the student's patch states (mask tokens in place);
    image_mask (b, patches) True at masked patches.

    - target float (b, patches, dim), features of the frozen base model (``teacher_patch_features``): mean of
      1 - cosine(pred, target). This replaces the paper's target, the codes of a VQ-KD visual tokenizer distilled
      from a pathology teacher, which was not released. Cosine rather than smooth-L1 because VQ-KD itself is
      trained to maximise cosine similarity to its teacher's features and looks codes up on L2-normalised vectors,
      so cosine on normalised features is the continuous counterpart of predicting its codes; it ignores the
      per-token norm of the final-LayerNorm states, and it is bounded in [0, 2], so it sits on the scale of the
      MLM cross-entropy without tuning a weight. The frozen teacher cannot drift, so the target cannot collapse.
    - target integer (b, patches), codes of a visual tokenizer: cross-entropy of pred (code logits) on them.
    """
    mask = image_mask.bool()
    if not mask.any():
        return pred.sum() * 0.0
    p, t = pred[mask], target[mask]
    if target.is_floating_point():
        return (1 - F.cosine_similarity(p.float(), t.float(), dim=-1)).mean()
    return F.cross_entropy(p.float(), t.long())


# -- image-text alignment --------------------------------------------------------------------------------------------


def clip_loss(image_feats: Tensor, text_feats: Tensor, logit_scale: Tensor) -> Tensor:
    """Symmetric InfoNCE over a batch of pairs (row i of each is a pair): features are L2-normalised here, the
    temperature is logit_scale.exp() capped at 100 as in CLIP."""
    image = F.normalize(image_feats.float(), dim=-1)
    text = F.normalize(text_feats.float(), dim=-1)
    scale = logit_scale.float().exp().clamp(max=LOGIT_SCALE_MAX)
    logits = scale * image @ text.t()  # (b, b), positives on the diagonal
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


class _CrossAttentionLayer(nn.Module):
    """Pre-LN: text attends over image tokens, then an MLP; both residual."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, text: Tensor, image: Tensor) -> Tensor:
        kv = self.norm_kv(image)
        text = text + self.attn(self.norm_q(text), kv, kv, need_weights=False)[0]
        return text + self.mlp(self.norm_mlp(text))


class CrossAttentionDecoder(nn.Module):
    """A small decoder for the stage-2 auxiliary MLM: text token states (queries) attend over image patch states,
    so that masked words must be recovered from the image (fine-grained alignment)."""

    def __init__(self, dim: int, heads: int, layers: int = 1):
        super().__init__()
        self.layers = nn.ModuleList(_CrossAttentionLayer(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, text: Tensor, image: Tensor) -> Tensor:
        """text (b, T, dim), image (b, patches, dim) -> (b, T, dim)."""
        for layer in self.layers:
            text = layer(text, image)
        return self.norm(text)


def aux_mlm_loss(
    decoder: CrossAttentionDecoder,
    head: nn.Module,
    text_hidden: Tensor,
    image_hidden: Tensor,
    labels: Tensor,
    weight: float = AUX_MLM_WEIGHT,
) -> Tensor:
    """weight x MLM loss of masked text predicted through the cross-attention decoder.

    text_hidden (b, T, dim): the model's states for the masked text; image_hidden (b, tokens, dim): its states for
    the paired image; labels (b, T) from ``whole_word_mask``. Added to ``clip_loss`` in stage 2 (weight 0.1).
    """
    logits, targets = masked_logits(head, decoder(text_hidden, image_hidden), labels)
    return weight * mlm_loss(logits, targets)


# -- outcomes --------------------------------------------------------------------------------------------------------


def discrete_time_nll(logits: Tensor, bin_index: Tensor, event: Tensor, alpha: float = 0.0) -> Tensor:
    """Negative log-likelihood of a discrete-time hazard model (Zadeh & Schmid 2020), mean over cases.

    logits (n, bins): hazard_k = sigmoid(logit_k), S_k = prod_{j<=k} (1 - hazard_j). A case with its event in bin
    y contributes -log hazard_y - log S_{y-1} (uncensored term); a case censored in bin y contributes -log S_y.
    loss = (1 - alpha) * (uncensored + censored) + alpha * uncensored. alpha = 0 (default) is the plain
    likelihood, which Zadeh & Schmid show is the consistent choice; alpha = 0.15 upweights events as in the
    pathology MIL survival literature (Chen et al.) and can be set for comparison.
    """
    y = bin_index.long().view(-1, 1)
    event = event.float().view(-1)
    log_survive = torch.cumsum(F.logsigmoid(-logits.float()), dim=1)  # log S_k
    log_survive_before = torch.cat([log_survive.new_zeros(len(y), 1), log_survive], dim=1).gather(1, y)  # log S_{y-1}
    log_hazard = F.logsigmoid(logits.float()).gather(1, y)
    uncensored = -event * (log_hazard + log_survive_before).view(-1)
    censored = -(1 - event) * log_survive.gather(1, y).view(-1)
    return ((1 - alpha) * (uncensored + censored) + alpha * uncensored).mean()


def cox_partial_likelihood(risk: Tensor, time: Tensor, event: Tensor) -> Tensor:
    """Negative Cox partial log-likelihood with Breslow's handling of ties, averaged over events:
    -1/|E| sum_{i in E} (r_i - log sum_{j: t_j >= t_i} exp r_j). Zero (differentiable) without events; the risk
    set is the batch, so use batches with several events."""
    risk = risk.float().view(-1)
    event = event.bool().view(-1)
    if not event.any():
        return risk.sum() * 0.0
    at_risk = time.view(1, -1) >= time.view(-1, 1)  # row i: who is still at risk at t_i
    log_denominator = torch.logsumexp(risk.view(1, -1).masked_fill(~at_risk, float("-inf")), dim=1)
    return -(risk - log_denominator)[event].mean()


def binary_response_loss(logits: Tensor, target: Tensor, pos_weight: float | None = None) -> Tensor:
    """Binary cross-entropy on logits (n,) for a 0/1 outcome; pos_weight counters class imbalance."""
    weight = None if pos_weight is None else torch.tensor(pos_weight, device=logits.device)
    return F.binary_cross_entropy_with_logits(logits.float(), target.float(), pos_weight=weight)


__all__ = [
    "CrossAttentionDecoder",
    "MimHead",
    "MlmHead",
    "aux_mlm_loss",
    "binary_response_loss",
    "clip_loss",
    "cox_partial_likelihood",
    "discrete_time_nll",
    "masked_logits",
    "mim_loss",
    "mlm_loss",
    "teacher_patch_features",
]
