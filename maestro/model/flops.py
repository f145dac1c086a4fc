"""Parameters per part and forward FLOPs per sample, for `maestro info` and MFU.

Parameters are counted on a model built on the `meta` device (no memory, instant for `large`), per
top-level part with the reference's names. FLOPs are analytic, forward only, counting matrix
multiplications at 2 FLOPs per multiply-add:

- a transformer block over a sequence of n tokens of width d, h heads of size d_h, MLP width f:
  `2·n·d·3hd_h` (qkv) + `2·2·n²·hd_h` (scores and their weighted sum) + `2·n·hd_h·d` (output) +
  `2·2·n·d·f` (MLP);
- encoder = patch embedding over all tokens `2·L·(c_g·p²)·E` + the per-key blocks over each
  sequence's *visible* tokens + the joint blocks over all keys' visible tokens of a sample;
- decoder = `enc_to_dec` `2·n_vis·E·E_d` (absent when E = E_d) + the decoder blocks over *all*
  tokens of each sequence + the 1×1 pixel projection `2·L·E_d·(c_g·p²)`.

Sequence lengths use each modality's configured `num_dates` and the model's own mask count
(`maestro.model.fusion.sequence_tokens`): one sequence per key for `group`/`mod`, one per image for
`shared`/`monotemp`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from maestro.model.fusion import PER_IMAGE, sequence_tokens
from maestro.model.mae import build_model, mask_rule, sequence_members
from maestro.sizes import SIZES

if TYPE_CHECKING:
    from maestro.config import Config

PARTS = ("patch_embed", "embed_to_rec", "encoder", "encoder_inter", "enc_to_dec", "decoder", "mask_token")


def parameter_counts(cfg: Config) -> dict[str, int]:
    """{"total": n, part: n} for the parts of the reference (heads excluded: not built here)."""
    with torch.device("meta"):
        model = build_model(cfg)
    counts = dict.fromkeys(PARTS, 0)
    for name, p in model.named_parameters():
        part = name.split(".", 1)[0]
        if part in counts:  # the downstream heads are not part of the pretraining model's count
            counts[part] += p.numel()
    return {"total": sum(counts.values()), **counts}


def block_flops(n: int, dim: int, heads: int, dim_head: int, hidden: int) -> float:
    """Forward matmul FLOPs of one transformer block over one sequence of n tokens."""
    inner = heads * dim_head
    return 2.0 * n * dim * 3 * inner + 4.0 * n * n * inner + 2.0 * n * inner * dim + 4.0 * n * dim * hidden


def flops_per_sample(cfg: Config) -> dict[str, float]:
    """{"encoder", "decoder", "total"} forward FLOPs per sample (formula in the module docstring)."""
    size = SIZES[cfg.model.size]
    mods = cfg.derived.modalities
    enc_depth = size.depth - cfg.model.inter_depth
    members = sequence_members(cfg)
    per_key = sequence_tokens(mods, members, cfg.model.fusion in PER_IMAGE, mask_rule(cfg))
    encoder = sum(2.0 * s.tokens * (s.channels * s.patch_size**2) * size.dim for s in mods.values())
    decoder = sum(2.0 * s.tokens * size.decoder_dim * (s.channels * s.patch_size**2) for s in mods.values())
    joint = 0
    for seq in per_key.values():
        n_seq, full, vis = seq.sequences, seq.length, seq.visible
        encoder += n_seq * enc_depth * block_flops(vis, size.dim, size.heads, size.dim_head, size.mlp_hidden)
        joint += n_seq * vis
        if size.dim != size.decoder_dim:
            decoder += 2.0 * n_seq * vis * size.dim * size.decoder_dim
        decoder += (
            n_seq
            * size.decoder_depth
            * block_flops(
                full, size.decoder_dim, size.decoder_heads, size.decoder_dim_head, size.decoder_mlp_hidden
            )
        )
    if cfg.model.inter_depth:
        encoder += cfg.model.inter_depth * block_flops(
            joint, size.dim, size.heads, size.dim_head, size.mlp_hidden
        )
    return {"encoder": encoder, "decoder": decoder, "total": encoder + decoder}
