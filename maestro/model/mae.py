"""The MAESTRO masked autoencoder (maestro_reference.md §1–3), single-device.

One pipeline serves padded and packed batches. At the entry a batch becomes packed rows of each
sample's real dates (`_entry`: a packed batch as it is, a padded one through `maestro.model.padded`,
which reads `MOD_ndates`), so padding never reaches attention or the loss. Then, top to bottom:
`prepare` (float32 targets: resize, invalid pixels zeroed), `embed` (patch embedding + position +
date, in the parameters' dtype), the packed layout of each sequence key (`maestro.model.packed`),
masks (`SequenceMasks` draws or checks them), `encode_rows` (per-key encoders then the joint
blocks), `decode` (un-mask with each position's own mask token, decoder), `loss`; outputs go back
to the batch's own layout. Tokens of a modality are ordered band group, date, row-major position;
a sequence key concatenates its modalities in input order.

Sequence keys by fusion mode (`maestro.model.fusion`): `group` one per fusion group, `mod` one per
modality; `monotemp` and `shared` one per modality whose tokens form one sequence per image (band
group and date), `shared` running every modality through one encoder and one decoder (module key
`shared`). Random draws mask exactly `masked_count` tokens of every sequence, at the ratio of the
sample's own dates × band groups. The loss weights modalities by the registry's `num_dates`
(`w_m = N_m·g_m²`, as the reference), not by the dates in the batch.

Targets and their statistics are computed in float32 whatever the dtype of the inputs and of the
parameters; only the encoder's input is cast to the parameters' dtype.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from maestro.modalities import ModalitySpec, TargetSpec
from maestro.model import targets
from maestro.model.attention import Packing, check_backend
from maestro.model.blocks import Transformer
from maestro.model.encodings import date_encoding, position_encoding, sincos_table
from maestro.model.fusion import PER_IMAGE, sequence_keys
from maestro.model.heads import build_heads
from maestro.model.masking import MaskRule, Structure, select_packed
from maestro.model.ops import kernel_ops
from maestro.model.output import Geometry, ModelOutput
from maestro.model.packed import PackedLayout, build_layout, is_packed, packed_dates
from maestro.model.padded import Padding, padding_of
from maestro.model.patch_embed import Patchify, Pixelify, to_patches
from maestro.model.sequence_masks import SequenceMasks
from maestro.sizes import SIZES, SizePreset

if TYPE_CHECKING:
    from maestro.config import Config

Batch = dict[str, Tensor]
LAYOUTS = 32  # packed layouts kept per model (see `MAESTRO.layout`)


class MAESTRO(nn.Module):
    """The model for modalities `specs` (name -> spec, in input order) and fusion groups `groups`
    (name -> modalities) at `size`, with one downstream head per target of `downstream` (`head`
    kind; segmentation heads at `crop_m`). `config` is kept for reference only (`build_model`
    passes the resolved config it translated)."""

    def __init__(
        self,
        specs: dict[str, ModalitySpec],
        groups: dict[str, list[str]],
        size: SizePreset,
        *,
        fusion: str = "group",
        inter_depth: int = 3,
        attention: str = "sdpa",
        kernels: str = "torch",
        use_date_enc: bool = True,
        interpolate: str = "nearest",
        grid_pos_enc: int = 0,
        mask: MaskRule | None = None,
        loss_kind: str = "l1",
        target_norm: str = "patch_group",
        downstream: dict[str, TargetSpec] | None = None,
        head: str = "attentive",
        crop_m: float = 0.0,
        config: Config | None = None,
    ):
        super().__init__()
        check_backend(attention)  # once, here: a model that builds can run its attention
        self.cfg = config
        self.specs = dict(specs)
        self.fusion, self.backend = fusion, attention
        self.dim, self.dec_dim = size.dim, size.decoder_dim
        self.date_scale = 1.0 if use_date_enc else 0.0
        self.interpolate = interpolate
        self.ops = kernel_ops(kernels)
        self.loss_kind = loss_kind
        self.norm_plans = {m: targets.norm_plan(m, s, target_norm) for m, s in self.specs.items()}

        self.members = sequence_keys(fusion, self.specs, groups)
        self.per_image = fusion in PER_IMAGE
        self.module_key = {k: ("shared" if fusion == "shared" else k) for k in self.members}

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
            return Transformer(size.dim, depth, size.heads, size.dim_head, size.mlp_hidden, attention)

        def decoder() -> Transformer:
            d = size.decoder_dim
            return Transformer(
                d,
                size.decoder_depth,
                size.decoder_heads,
                size.decoder_dim_head,
                size.decoder_mlp_hidden,
                attention,
            )

        def enc_to_dec() -> nn.Module:
            return nn.Identity() if size.dim == size.decoder_dim else nn.Linear(size.dim, size.decoder_dim)

        keys = list(dict.fromkeys(self.module_key.values()))
        self.encoder = nn.ModuleDict({k: encoder(size.depth - inter_depth) for k in keys})
        self.encoder_inter = encoder(inter_depth) if inter_depth else None
        self.enc_to_dec = nn.ModuleDict({k: enc_to_dec() for k in keys})
        self.decoder = nn.ModuleDict({k: decoder() for k in keys})
        self.mask_token = nn.ParameterDict(
            {
                m: nn.Parameter(torch.randn(1, len(s.groups), 1, 1, size.decoder_dim))
                for m, s in self.specs.items()
            }
        )
        # Position tables per modality, computed once (non-persistent: not in checkpoints).
        side = grid_pos_enc or math.lcm(*(s.grid for s in self.specs.values()))
        enc_table, dec_table = sincos_table(side, size.dim), sincos_table(side, size.decoder_dim)
        for m, s in self.specs.items():
            self.register_buffer(f"pos_enc_{m}", position_encoding(enc_table, s.grid), persistent=False)
            self.register_buffer(f"pos_dec_{m}", position_encoding(dec_table, s.grid), persistent=False)
        self.masking = SequenceMasks(self.specs, self.members, self.per_image, mask or MaskRule())
        self.geometry = {m: Geometry(tuple(s.groups), s.grid, s.patch_size) for m, s in self.specs.items()}
        self._layouts: dict[tuple, PackedLayout] = {}
        self.heads = build_heads(downstream or {}, self.specs, size.dim, head, crop_m)

    def pos_enc(self, m: str, decoder: bool = False) -> Tensor:
        return getattr(self, f"pos_{'dec' if decoder else 'enc'}_{m}")

    # --- entry: every batch as packed rows of its real dates ----------------------------------

    def layout(self, dates: dict[str, list[int]], device) -> PackedLayout:
        """The packed layout of samples holding `dates` (per modality, per sample). Layouts are kept
        per date counts (`LAYOUTS` of them, the oldest dropped first): a run of padded batches of
        one shape builds its index maps once."""
        key = (str(device), *(tuple(dates[m]) for m in self.specs))
        if key not in self._layouts:
            if len(self._layouts) >= LAYOUTS:
                del self._layouts[next(iter(self._layouts))]
            self._layouts[key] = build_layout(dates, self.specs, self.members, self.per_image, device)
        return self._layouts[key]

    def _entry(self, batch: Batch) -> tuple[Batch, Padding | None, PackedLayout]:
        """The batch as a packed batch of its real dates, the padding to restore in the outputs
        (None for a packed batch), and its layout."""
        if is_packed(batch):
            packed, pad, dates = batch, None, packed_dates(batch, self.specs)
        else:
            pad = padding_of(batch, self.specs, self.members)
            packed, dates = pad.pack(batch), pad.counts
        return packed, pad, self.layout(dates, batch["ref_date"].device)

    # --- tokens -----------------------------------------------------------------------------------

    def prepare(self, batch: Batch) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Per modality of a packed batch: the float32 input resized to image_size (1, ΣT, C, S, S)
        with invalid pixels zeroed (the targets, whatever the input's dtype), and the valid pixels
        (1, ΣT, S, S): `MOD_valid` if given, and finite in every band."""
        xs, valids = {}, {}
        for m, s in self.specs.items():
            x = batch[m].float()
            b, t = x.shape[:2]
            valid = batch.get(f"{m}_valid")
            size = (s.image_size, s.image_size)
            if x.shape[-2:] != size:
                x = F.interpolate(x.flatten(0, 1), size=size, mode=self.interpolate).unflatten(0, (b, t))
            if valid is not None and valid.shape[-2:] != size:
                valid = F.interpolate(valid.flatten(0, 1)[:, None].float(), size=size, mode="nearest")
                valid = valid.view(b, t, *size)
            finite = torch.isfinite(x).all(2)
            valid = finite if valid is None else finite & valid.bool()
            xs[m], valids[m] = torch.where(valid[:, :, None], x, 0.0), valid
        return xs, valids

    def encodings(self, batch: Batch, m: str, t: int, decoder: bool) -> Tensor:
        """Position + date encodings of modality m of a packed batch: (1, G·ΣT·L, dim), each date
        relative to its own sample's reference date."""
        dim = self.dec_dim if decoder else self.dim
        g = len(self.specs[m].groups)
        cu = batch[f"{m}_cu_dates"]
        ref = batch["ref_date"][:, 0].repeat_interleave(cu.diff().long(), 0, output_size=t)[None]
        dates = date_encoding(batch[f"{m}_dates"], ref, dim, self.date_scale)  # (1, ΣT, dim)
        dates = repeat(dates, "b t e -> b (g t) 1 e", g=g)
        return (dates + self.pos_enc(m, decoder)).flatten(1, 2)

    def embed(self, batch: Batch, xs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Tokens per modality (1, G·ΣT·L, E) in native order: patch embedding of the input cast to
        the parameters' dtype, + position + date."""
        out = {}
        for m, x in xs.items():
            patchify = self.patch_embed[self.specs[m].embed]
            dtype = patchify.patchify_bands[0].conv.weight.dtype
            tok = patchify(x.to(dtype)).flatten(1, 2)  # (1, G·ΣT·L, E)
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

    def encode(self, batch: Batch) -> dict[str, Tensor]:
        """All tokens after the full encoder, without masking: {MOD: (B, T·G·L, E)} for a padded
        batch (zeros at padding dates); for a packed batch {MOD: (1, Σ_i G·T_i·L, E)}, sample after
        sample, each in the order above."""
        packed, pad, lay = self._entry(batch)
        xs, _ = self.prepare(packed)
        seqs = lay.to_packed(self.embed(packed, xs), self.members)
        enc = lay.per_sample(self.encode_rows(seqs, lay.packing), self.members)
        return enc if pad is None else {m: pad.tokens_back(m, v) for m, v in enc.items()}

    def predict(self, batch: Batch, frozen: bool = False) -> dict[str, Tensor]:
        """Downstream logits of every head, {TARGET: (B, K) or (B, K, H, W)}, from all tokens
        (`maestro.model.heads`). `frozen`: the encoder runs without gradients (probing)."""
        if is_packed(batch):
            raise ValueError("downstream heads take padded batches; set data.token_budget=0")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            tokens = self.encode(batch)
        return {name: head(tokens) for name, head in self.heads.items()}

    # --- decoder and loss -------------------------------------------------------------------------

    def decode(
        self,
        batch: Batch,
        t: dict[str, int],
        enc: dict[str, Tensor],
        sources: dict[str, Tensor],
        lay: PackedLayout,
    ) -> dict[str, Tensor]:
        """Encoded visible rows {key: (K, E)} -> decoder tokens {key: (ΣL_key, E_d)}: `enc_to_dec`,
        un-mask (masked position i takes the mask token of its modality and band group, the
        layout's `group_ids`; `sources` maps positions to rows, −1 where masked), decoder
        encodings, the key's decoder on the layout's sequences."""
        dec_enc = {m: self.encodings(batch, m, t[m], decoder=True) for m in self.specs}
        dec_enc = lay.to_packed(dec_enc, self.members)
        out = {}
        for key, rows in enc.items():
            mk = self.module_key[key]
            table = torch.cat([self.mask_token[m].reshape(-1, self.dec_dim) for m in self.members[key]])
            y = self.enc_to_dec[mk](rows)
            full = self.ops.unmask_rows(y, sources[key], table.to(y.dtype), lay.group_ids[key])
            out[key] = self.decoder[mk](full + dec_enc[key].to(full.dtype), lay.packing[key])
        return out

    def forward(
        self, batch: Batch, mask: dict[str, Tensor] | None = None, generator: torch.Generator | None = None
    ) -> ModelOutput:
        """Pretraining forward: masks drawn from `generator` (or the given `mask`: {key: (B, L_key)}
        for a padded batch, {key: (ΣL_key,)} for a packed one), loss and outputs in the batch's
        layout (`ModelOutput`)."""
        packed, pad, lay = self._entry(batch)
        xs, valids = self.prepare(packed)
        seqs = lay.to_packed(self.embed(packed, xs), self.members)  # {key: (ΣL_key, E)}
        device = batch["ref_date"].device
        if mask is None:
            masks, visible = self.masking.draw(lay, generator, device)
        else:
            masks, visible = self.masking.check(mask if pad is None else pad.masks_in(mask), lay)
        sel = {k: select_packed(masks[k], visible[k]) for k in seqs}
        rows = {k: self.ops.gather_rows(x, sel[k].rows) for k, x in seqs.items()}
        enc = self.encode_rows(rows, {k: v.packing for k, v in sel.items()})
        t = {m: x.shape[1] for m, x in xs.items()}
        dec = self.decode(packed, t, enc, {k: v.source for k, v in sel.items()}, lay)
        dec, token_masks = lay.to_native(dec, self.members), lay.to_native(masks, self.members)
        out = self.loss(dec, xs, valids, token_masks, masks)
        if pad is None:
            out.cu_seqlens = {k: p.cu_seqlens for k, p in lay.packing.items()}
            return out
        return self._unpad(out, pad)

    def loss(
        self,
        dec: dict[str, Tensor],
        xs: dict[str, Tensor],
        valids: dict[str, Tensor],
        token_masks: dict[str, Tensor],
        masks: dict[str, Tensor],
    ) -> ModelOutput:
        """Pixelify each modality's decoder tokens (1, G·ΣT·L, E_d) and compute the masked loss
        against the float32 targets, modalities weighted by `num_dates · g²`."""
        sums, weights, patches = {}, {}, {}
        for m, d in dec.items():
            s = self.specs[m]
            t = xs[m].shape[1]
            patches[m] = self.embed_to_rec[s.embed](d)  # (ΣT·L, P, C)
            target = to_patches(xs[m], s.patch_size)
            valid = to_patches(valids[m][:, :, None], s.patch_size)[..., 0]  # (ΣT·L, P)
            tm = rearrange(token_masks[m], "b (g t l) -> g (b t l)", g=len(s.groups), t=t)
            sums[m] = targets.modality_loss(
                self.ops, patches[m], target, valid, tm, s.groups, self.norm_plans[m], self.loss_kind
            )
            weights[m] = float(s.num_dates * s.tokens_per_date)
        total, per_mod = targets.combine(sums, weights)
        return ModelOutput(total, per_mod, xs, masks, valids, token_masks, patches, self.geometry)

    def _unpad(self, out: ModelOutput, pad: Padding) -> ModelOutput:
        """A packed batch's output in the padded batch's layout (`maestro.model.padded`)."""
        masks = pad.masks_back(out.masks)
        token_masks = {}
        for key, ms in self.members.items():
            token_masks.update(zip(ms, torch.split(masks[key], [pad.tokens[m] for m in ms], 1)))
        return ModelOutput(
            out.loss,
            out.loss_per_modality,
            {m: pad.dates_back(m, x) for m, x in out.targets.items()},
            masks,
            {m: pad.dates_back(m, v, False) for m, v in out.valid.items()},
            token_masks,
            {m: pad.patches_back(m, p) for m, p in out.patches.items()},
            self.geometry,
        )


def mask_rule(cfg: Config) -> MaskRule:
    """The model's masking from the config's `mask` section."""
    mk = cfg.mask
    return MaskRule(mk.ratio, mk.scale, Structure(mk.modality, mk.bands, mk.dates, mk.locations))


def sequence_members(cfg: Config) -> dict[str, list[str]]:
    """The config's sequence keys: key -> modalities (`maestro.model.fusion.sequence_keys`)."""
    return sequence_keys(cfg.model.fusion, cfg.derived.modalities, cfg.derived.groups)


def build_model(cfg: Config) -> MAESTRO:
    """The model for a resolved config: the config's values translated to the model's arguments."""
    m = cfg.model
    return MAESTRO(
        dict(cfg.derived.modalities),
        dict(cfg.derived.groups),
        SIZES[m.size],
        fusion=m.fusion,
        inter_depth=m.inter_depth,
        attention=m.attention,
        kernels=m.kernels,
        use_date_enc=m.use_date_enc,
        interpolate=m.interpolate,
        grid_pos_enc=cfg.derived.grid_pos_enc,
        mask=mask_rule(cfg),
        loss_kind=cfg.loss.kind,
        target_norm=cfg.loss.target_norm,
        downstream=dict(cfg.derived.targets),
        head=m.head,
        crop_m=cfg.derived.crop_m,
        config=cfg,
    )
