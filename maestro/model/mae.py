"""The MAESTRO masked autoencoder (maestro_reference.md §1–3), single-device.

Read top to bottom: `prepare` (resize, invalid pixels zeroed), `embed` (patch embedding + position
+ date), `to_sequences` (fusion: one token sequence per key), masks (`SequenceMasks` draws or checks
them), `encode_rows` (per-key encoders then the joint blocks), `decode` (un-mask with each
position's own mask token, decoder), `loss`. Tokens of a modality are ordered band group, date,
row-major position; a sequence key concatenates its modalities in input order.

Sequence keys by `model.fusion` (also the keys of the masks, as `maestro.info.sequences`):
- `group`: one per fusion group (groups come from the registry, so YAML can regroup modalities);
- `mod`: one per modality;
- `monotemp`, `shared`: one per modality, whose tokens form one sequence per image (band group and
  date); masks are `(B, G·T·L)` with exactly `round(ratio·L)` masked tokens per image when drawn.
  `shared` runs every modality through one encoder and one decoder (module key `shared`).
Inside the encoder tokens travel as packed rows (`attention.Packing`), so given masks with unequal
visible counts per sample work too; random draws keep every sequence the same length.

Packed batches (`MOD_cu_dates` present; layout in `maestro.model.packed`) hold samples with their own
date counts: every sequence has its own length, the random draw masks `round(ratio·L)` of each (the
ratio from the sample's own dates × band groups), and encoder, joint blocks and decoder run on the
packed rows without padding. Their loss weights modalities by the registry's `num_dates`
(`w_m = N_m·g_m²`, as the reference), not by the dates in the batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from maestro.config import Config
from maestro.model import targets
from maestro.model.attention import Packing, check_backend
from maestro.model.blocks import Transformer
from maestro.model.encodings import date_encoding, position_encoding, sincos_table
from maestro.model.heads import build_heads
from maestro.model.masking import select_packed, select_visible
from maestro.model.ops import kernel_ops
from maestro.model.output import Geometry, ModelOutput
from maestro.model.packed import build_layout, check_masks, is_packed
from maestro.model.patch_embed import Patchify, Pixelify, to_patches
from maestro.model.sequence_masks import SequenceMasks
from maestro.sizes import SIZES

Batch = dict[str, Tensor]


class MAESTRO(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        size = SIZES[cfg.model.size]
        self.specs = dict(cfg.derived.modalities)
        self.fusion, self.backend = cfg.model.fusion, cfg.model.attention
        self.dim, self.dec_dim = size.dim, size.decoder_dim
        self.date_scale = 1.0 if cfg.model.use_date_enc else 0.0
        self.ops = kernel_ops(cfg.model.kernels)
        self.loss_kind = cfg.loss.kind
        self.norm_plans = {m: targets.norm_plan(m, s, cfg.loss.target_norm) for m, s in self.specs.items()}

        if self.fusion == "group":
            self.members = {k: list(v) for k, v in cfg.derived.groups.items()}
        else:
            self.members = {m: [m] for m in self.specs}
        self.per_image = self.fusion in ("shared", "monotemp")
        self.module_key = {k: ("shared" if self.fusion == "shared" else k) for k in self.members}

        first = {}
        for s in self.specs.values():
            first.setdefault(s.embed, s)
        self.patch_embed = nn.ModuleDict(
            {e: Patchify(s.groups, size.dim, s.patch_size) for e, s in first.items()}
        )
        self.embed_to_rec = nn.ModuleDict(
            {e: Pixelify(s.groups, size.decoder_dim, s.patch_size) for e, s in first.items()}
        )

        def encoder(depth: int) -> Transformer:
            return Transformer(size.dim, depth, size.heads, size.dim_head, size.mlp_hidden, self.backend)

        def decoder() -> Transformer:
            d = size.decoder_dim
            return Transformer(
                d,
                size.decoder_depth,
                size.decoder_heads,
                size.decoder_dim_head,
                size.decoder_mlp_hidden,
                self.backend,
            )

        def enc_to_dec() -> nn.Module:
            return nn.Identity() if size.dim == size.decoder_dim else nn.Linear(size.dim, size.decoder_dim)

        keys = list(dict.fromkeys(self.module_key.values()))
        self.encoder = nn.ModuleDict({k: encoder(size.depth - cfg.model.inter_depth) for k in keys})
        self.encoder_inter = encoder(cfg.model.inter_depth) if cfg.model.inter_depth else None
        self.enc_to_dec = nn.ModuleDict({k: enc_to_dec() for k in keys})
        self.decoder = nn.ModuleDict({k: decoder() for k in keys})
        self.mask_token = nn.ParameterDict(
            {
                m: nn.Parameter(torch.randn(1, len(s.groups), 1, 1, size.decoder_dim))
                for m, s in self.specs.items()
            }
        )
        # Position tables per modality, computed once (non-persistent: not in checkpoints).
        side = cfg.derived.grid_pos_enc or math.lcm(*(s.grid for s in self.specs.values()))
        enc_table, dec_table = sincos_table(side, size.dim), sincos_table(side, size.decoder_dim)
        for m, s in self.specs.items():
            self.register_buffer(f"pos_enc_{m}", position_encoding(enc_table, s.grid), persistent=False)
            self.register_buffer(f"pos_dec_{m}", position_encoding(dec_table, s.grid), persistent=False)
        self.masking = SequenceMasks(cfg, self.specs, self.members, self.per_image)
        self.geometry = {m: Geometry(tuple(s.groups), s.grid, s.patch_size) for m, s in self.specs.items()}
        self.heads = build_heads(
            cfg.derived.targets, self.specs, size.dim, cfg.model.head, cfg.derived.crop_m
        )

    # --- configuration helpers ------------------------------------------------------------------

    def pos_enc(self, m: str, decoder: bool = False) -> Tensor:
        return getattr(self, f"pos_{'dec' if decoder else 'enc'}_{m}")

    # --- tokens -----------------------------------------------------------------------------------

    def prepare(self, batch: Batch) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Per modality: input resized to image_size (B, T, C, S, S) with invalid pixels zeroed, and
        the valid pixels (B, T, S, S): `MOD_valid` if given, and finite in every band."""
        xs, valids = {}, {}
        for m, s in self.specs.items():
            x = batch[m]
            b, t = x.shape[:2]
            valid = batch.get(f"{m}_valid")
            size = (s.image_size, s.image_size)
            if x.shape[-2:] != size:
                mode = self.cfg.model.interpolate
                x = F.interpolate(x.flatten(0, 1).float(), size=size, mode=mode).unflatten(0, (b, t))
            if valid is not None and valid.shape[-2:] != size:
                valid = F.interpolate(valid.flatten(0, 1)[:, None].float(), size=size, mode="nearest")
                valid = valid.view(b, t, *size)
            finite = torch.isfinite(x).all(2)
            valid = finite if valid is None else finite & valid.bool()
            xs[m], valids[m] = torch.where(valid[:, :, None], x, 0.0), valid
        return xs, valids

    def encodings(self, batch: Batch, m: str, t: int, decoder: bool) -> Tensor:
        """Position + date encodings of modality m: (B, G·T·L, dim)."""
        dim = self.dec_dim if decoder else self.dim
        g = len(self.specs[m].groups)
        ref, cu = batch["ref_date"], batch.get(f"{m}_cu_dates")
        if cu is not None:  # packed: each date takes its own sample's reference date, (1, ΣT, 3)
            ref = ref[:, 0].repeat_interleave(cu.diff().long(), 0, output_size=t)[None]
        dates = date_encoding(batch[f"{m}_dates"], ref, dim, self.date_scale)  # (B, T, dim)
        dates = repeat(dates, "b t e -> b (g t) 1 e", g=g)
        return (dates + self.pos_enc(m, decoder)).flatten(1, 2)

    def embed(self, batch: Batch, xs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Tokens per modality (B, G·T·L, E): patch embedding + position + date."""
        if self.backend == "flash":
            x = next(iter(xs.values()))
            autocast = torch.is_autocast_enabled(x.device.type)
            check_backend(
                self.backend, x.device, torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
            )
        out = {}
        for m, x in xs.items():
            tok = self.patch_embed[self.specs[m].embed](x).flatten(1, 2)  # (B, G·T·L, E)
            out[m] = tok + self.encodings(batch, m, x.shape[1], decoder=False).to(tok.dtype)
        return out

    # --- encoder ----------------------------------------------------------------------------------

    def encode_rows(self, rows: dict[str, Tensor], packs: dict[str, Packing]) -> dict[str, Tensor]:
        """Per-key encoders on packed rows (N_k, E), then the joint blocks on each sample's tokens
        of all keys concatenated in key order, split back."""
        out = {k: self.encoder[self.module_key[k]](x, packs[k]) for k, x in rows.items()}
        if self.encoder_inter is None:
            return out
        keys = list(out)
        cu = sum(packs[k].cu_seqlens for k in keys)  # rows before each sample in the joint layout
        uniform = [packs[k].uniform for k in keys]
        joint = Packing(cu, sum(packs[k].max_seqlen for k in keys), None if None in uniform else sum(uniform))
        dest, before = [], torch.zeros_like(cu[:-1])
        for k in keys:
            pk = packs[k]
            n = torch.arange(out[k].shape[0], device=cu.device)
            sample = torch.searchsorted(pk.cu_seqlens[1:], n, right=True)
            dest.append(cu[sample] + before[sample] + n - pk.cu_seqlens[sample])
            before = before + pk.cu_seqlens.diff()
        dest_all = torch.cat(dest)
        x = torch.cat([out[k] for k in keys])
        x = torch.empty_like(x).index_copy(0, dest_all, x)
        x = self.encoder_inter(x, joint)
        return {k: x.index_select(0, d) for k, d in zip(keys, dest)}

    def to_sequences(self, tokens: dict[str, Tensor]) -> dict[str, Tensor]:
        """{key: (B, L_key, E)}: each key's modalities concatenated in input order."""
        return {k: torch.cat([tokens[m] for m in ms], 1) for k, ms in self.members.items()}

    def from_sequences(self, seqs: dict[str, Tensor], counts: dict[str, int]) -> dict[str, Tensor]:
        """Inverse of `to_sequences`: {MOD: (B, n_m, E)} given tokens per sample `counts`."""
        out = {}
        for k, ms in self.members.items():
            out.update(zip(ms, torch.split(seqs[k], [counts[m] for m in ms], 1)))
        return out

    def encode(self, batch: Batch) -> dict[str, Tensor]:
        """All tokens after the full encoder, without masking: {MOD: (B, T·G·L, E)}; for a packed
        batch {MOD: (1, Σ_i G·T_i·L, E)}, sample after sample, each in the order above."""
        xs, _ = self.prepare(batch)
        tokens = self.embed(batch, xs)
        if is_packed(batch):
            lay = build_layout(batch, self.specs, self.members, self.per_image)
            enc = self.encode_rows(lay.to_packed(tokens, self.members), lay.packing)
            return lay.per_sample(enc, self.members)
        seqs = self.to_sequences(tokens)
        b = next(iter(seqs.values())).shape[0]
        rows, packs = {}, {}
        for k, x in seqs.items():
            length = self.masking.seq_len(k, x.shape[1])
            rows[k] = x.flatten(0, 1)
            packs[k] = Packing.dense(x.shape[0] * x.shape[1] // length, length, x.device)
        enc = self.encode_rows(rows, packs)
        seqs = {k: v.view(b, -1, v.shape[-1]) for k, v in enc.items()}
        return self.from_sequences(seqs, {m: t.shape[1] for m, t in tokens.items()})

    def predict(self, batch: Batch, frozen: bool = False) -> dict[str, Tensor]:
        """Downstream logits of every head, {TARGET: (B, K) or (B, K, H, W)}, from all tokens
        (`maestro.model.heads`). `frozen`: the encoder runs without gradients (probing)."""
        if is_packed(batch):
            raise ValueError("downstream heads take padded batches; set data.token_budget=0")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            tokens = self.encode(batch)
        return {name: head(tokens) for name, head in self.heads.items()}

    # --- decoder and loss -------------------------------------------------------------------------

    def _mask_ids(self, key: str, shapes: dict[str, tuple[int, int, int]], device) -> Tensor:
        """Which mask token (of the key's modalities and band groups, in order) each position of a
        sample's sequence takes (L_key,) — its own modality's and band group's."""
        ids, offset = [], 0
        for m in self.members[key]:
            g, t, n = shapes[m]
            ids.append(torch.arange(offset, offset + g, device=device).repeat_interleave(t * n))
            offset += g
        return torch.cat(ids)

    def _decode_key(
        self, key: str, rows: Tensor, source: Tensor, ids: Tensor, encodings: Tensor, packing: Packing
    ) -> Tensor:
        """One key's encoded visible rows (K, E) -> decoder tokens (N, E_d): `enc_to_dec`, un-mask
        (masked position i takes mask token `ids[i]`, see `_mask_ids`), decoder `encodings` (N, E_d)
        added, the key's decoder on sequences `packing`."""
        mk = self.module_key[key]
        table = torch.cat([self.mask_token[m].reshape(-1, self.dec_dim) for m in self.members[key]])
        y = self.enc_to_dec[mk](rows)
        full = self.ops.unmask_rows(y, source, table.to(y.dtype), ids)
        full = full + encodings.to(full.dtype)
        return self.decoder[mk](full, packing)

    def decode(
        self, batch: Batch, enc: dict[str, Tensor], sel: dict, shapes: dict, b: int
    ) -> dict[str, Tensor]:
        """Encoded visible rows -> decoder tokens {key: (B, L_key, E_d)}: `enc_to_dec`, un-mask
        (each masked position gets its own mask token), decoder encodings, per-key decoder."""
        out = {}
        for key, rows in enc.items():
            ids = self._mask_ids(key, shapes, rows.device).repeat(b)
            dec_enc = torch.cat(
                [self.encodings(batch, m, shapes[m][1], decoder=True) for m in self.members[key]], 1
            )
            length = dec_enc.shape[1]
            seq = self.masking.seq_len(key, length)
            packing = Packing.dense(b * length // seq, seq, rows.device)
            full = self._decode_key(key, rows, sel[key].source, ids, dec_enc.flatten(0, 1), packing)
            out[key] = full.view(b, length, -1)
        return out

    def forward(
        self, batch: Batch, mask: dict[str, Tensor] | None = None, generator: torch.Generator | None = None
    ) -> ModelOutput:
        """Pretraining forward: masks drawn from `generator` (or the given `mask`), loss and outputs.
        A packed batch takes and returns masks {key: (ΣL_key,)} (see `forward_packed`)."""
        if is_packed(batch):
            return self.forward_packed(batch, mask, generator)
        xs, valids = self.prepare(batch)
        tokens = self.embed(batch, xs)
        seqs = self.to_sequences(tokens)
        b = next(iter(seqs.values())).shape[0]
        device = next(iter(seqs.values())).device
        shapes = {m: (len(s.groups), xs[m].shape[1], s.tokens_per_date) for m, s in self.specs.items()}
        lengths = {k: v.shape[1] for k, v in seqs.items()}
        if mask is None:
            masks, visible = self.masking.draw(shapes, b, generator, device)
        else:
            masks, visible = self.masking.check(mask, lengths, b), dict.fromkeys(lengths)
        sel, rows, packs = {}, {}, {}
        for k, x in seqs.items():
            seq = self.masking.seq_len(k, lengths[k])
            sel[k] = select_visible(masks[k].view(-1, seq), visible[k])
            rows[k] = self.ops.gather_rows(x.flatten(0, 1), sel[k].rows)
            packs[k] = sel[k].packing
        enc = self.encode_rows(rows, packs)
        counts = {m: t.shape[1] for m, t in tokens.items()}
        dec = self.from_sequences(self.decode(batch, enc, sel, shapes, b), counts)
        num_dates = {m: x.shape[1] for m, x in xs.items()}
        return self.loss(dec, xs, valids, self.from_sequences(masks, counts), masks, num_dates)

    # --- packed batches ---------------------------------------------------------------------------

    def forward_packed(
        self, batch: Batch, mask: dict[str, Tensor] | None, generator: torch.Generator | None
    ) -> ModelOutput:
        """`forward` on a packed batch: tokens in native order (`maestro.model.packed`) to packed
        sequences, masks {key: (ΣL_key,)}, encoder, joint blocks and decoder on packed rows, back to
        native order for the loss; the output also carries each key's `cu_seqlens`."""
        xs, valids = self.prepare(batch)
        tokens = self.embed(batch, xs)  # {MOD: (1, G·ΣT·L, E)}
        lay = build_layout(batch, self.specs, self.members, self.per_image)
        seqs = lay.to_packed(tokens, self.members)  # {key: (ΣL_key, E)}
        device = next(iter(seqs.values())).device
        if mask is None:
            masks, visible = self.masking.draw_packed(lay, generator, device)
        else:
            masks, visible = check_masks(mask, lay)
        sel = {k: select_packed(masks[k], visible[k]) for k in seqs}
        rows = {k: self.ops.gather_rows(x, sel[k].rows) for k, x in seqs.items()}
        enc = self.encode_rows(rows, {k: v.packing for k, v in sel.items()})
        dec_enc = {m: self.encodings(batch, m, xs[m].shape[1], decoder=True) for m in self.specs}
        dec_enc = lay.to_packed(dec_enc, self.members)
        dec = {
            k: self._decode_key(k, r, sel[k].source, lay.group_ids[k], dec_enc[k], lay.packing[k])
            for k, r in enc.items()
        }
        dec, token_masks = lay.to_native(dec, self.members), lay.to_native(masks, self.members)
        num_dates = {m: s.num_dates for m, s in self.specs.items()}  # the registry's, as the reference
        out = self.loss(dec, xs, valids, token_masks, masks, num_dates)
        out.cu_seqlens = {k: p.cu_seqlens for k, p in lay.packing.items()}
        return out

    def loss(
        self,
        dec: dict[str, Tensor],
        xs: dict[str, Tensor],
        valids: dict[str, Tensor],
        token_masks: dict[str, Tensor],
        masks: dict[str, Tensor],
        num_dates: dict[str, int],
    ) -> ModelOutput:
        """Pixelify each modality's decoder tokens and compute the masked loss, modalities weighted
        by `num_dates · g²`."""
        sums, weights, patches = {}, {}, {}
        for m, d in dec.items():
            s = self.specs[m]
            t = xs[m].shape[1]
            patches[m] = self.embed_to_rec[s.embed](d)  # (B·T·L, P, C)
            target = to_patches(xs[m], s.patch_size)
            valid = to_patches(valids[m][:, :, None], s.patch_size)[..., 0]  # (B·T·L, P)
            tm = rearrange(token_masks[m], "b (g t l) -> g (b t l)", g=len(s.groups), t=t)
            sums[m] = targets.modality_loss(
                self.ops, patches[m], target, valid, tm, s.groups, self.norm_plans[m], self.loss_kind
            )
            weights[m] = float(num_dates[m] * s.tokens_per_date)
        total, per_mod = targets.combine(sums, weights)
        return ModelOutput(total, per_mod, xs, masks, valids, token_masks, patches, self.geometry)


def build_model(cfg: Config) -> MAESTRO:
    """The model for a resolved config."""
    return MAESTRO(cfg)
