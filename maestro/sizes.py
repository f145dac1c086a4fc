"""Model size presets, one table with the reference's numbers (maestro_reference.md §1.12).

`base` is the reference's `medium` (the paper's "base"). `debug` is ours alone (as torchtitan's
`debugmodel`): a few hundred thousand parameters, for tests and quick checks; it has no reference
counterpart and no released weights. The decoder MLP hidden width is
`encoder dim × decoder_mlp_ratio`, a reference quirk kept for weight compatibility.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SizePreset:
    dim: int
    depth: int
    heads: int
    dim_head: int
    mlp_ratio: int
    decoder_dim: int
    decoder_depth: int
    decoder_heads: int
    decoder_dim_head: int
    decoder_mlp_ratio: int

    @property
    def mlp_hidden(self) -> int:
        return self.dim * self.mlp_ratio

    @property
    def decoder_mlp_hidden(self) -> int:
        return self.dim * self.decoder_mlp_ratio  # reference quirk: encoder dim, not decoder dim


SIZES = {
    #                 E     depth heads dh  mlp  E_d  d_depth d_heads d_dh d_mlp
    "debug": SizePreset(32, 2, 2, 16, 2, 32, 1, 2, 16, 2),
    "tiny": SizePreset(192, 12, 3, 64, 2, 512, 1, 16, 32, 4),
    "small": SizePreset(384, 12, 6, 64, 2, 512, 2, 16, 32, 4),
    "base": SizePreset(768, 12, 12, 64, 4, 512, 3, 16, 32, 4),
    "large": SizePreset(1024, 24, 16, 64, 4, 512, 4, 16, 32, 4),
}

# Names used by the reference (and its released checkpoints) for the same presets.
REFERENCE_NAMES = {"tiny": "tiny", "small": "small", "base": "medium", "large": "large"}
