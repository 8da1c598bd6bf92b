"""Architecture configuration of MUSK models; named presets are data, not branches in code."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class MuskConfig:
    """Shape of a BEiT-3 style multiway MUSK encoder.

    The defaults are the released ``musk_large_patch16_384`` checkpoint; ``tiny()`` is the same architecture at a
    size that trains on a laptop CPU in seconds, for tests and demos.
    """

    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    ffn_dim: int = 4096
    img_size: int = 384
    patch_size: int = 16
    in_chans: int = 3
    vocab_size: int = 64010
    max_text_positions: int = 1024
    layernorm_eps: float = 1e-5
    # Recompute each block in the backward pass instead of storing its activations (training only).
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def grid_size(self) -> int:
        """Patches along one side of the image."""
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_vision_tokens(self) -> int:
        """Patches plus the CLS token."""
        return self.num_patches + 1

    @classmethod
    def large(cls, **changes) -> MuskConfig:
        """The released MUSK (musk_large_patch16_384): 675,188,737 parameters."""
        return replace(cls(), **changes)

    @classmethod
    def tiny(cls, **changes) -> MuskConfig:
        """A two-layer miniature of the same architecture for tests and demos (about 4.5M parameters,
        most of them the 64,010-row text embedding so that any MUSK tokenizer's ids fit)."""
        base = cls(embed_dim=64, depth=2, num_heads=4, ffn_dim=256, img_size=96, max_text_positions=256)
        return replace(base, **changes)

    @classmethod
    def preset(cls, name: str, **changes) -> MuskConfig:
        """A preset by name: ``"large"`` or ``"tiny"``."""
        presets = {"large": cls.large, "tiny": cls.tiny}
        if name not in presets:
            raise ValueError(f"unknown MUSK preset {name!r}; choose one of {sorted(presets)}")
        return presets[name](**changes)

    def to_dict(self) -> dict:
        return asdict(self)
