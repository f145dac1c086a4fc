"""The transformer of the reference (vit-pytorch 1.10 `Transformer`), on packed rows.

Pre-norm blocks `x += Attn(LN(x))`, `x += FF(LN(x))` with a bias-free qkv projection, a GELU MLP and
a final LayerNorm. Module names follow the reference state dict (`layers.{i}.0.to_qkv`,
`layers.{i}.1.net.4`, `norm`, …) so released weights load by name. Rows are `(N, E)`; a `Packing`
says which rows form one sequence (see `attention.py`).
"""

from __future__ import annotations

from einops import rearrange
from torch import Tensor, nn

from maestro.model.attention import Packing, attention


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, backend: str):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.backend = heads, backend
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(0.0))

    def forward(self, x: Tensor, packing: Packing) -> Tensor:
        qkv = rearrange(self.to_qkv(self.norm(x)), "n (three h d) -> three n h d", three=3, h=self.heads)
        out = attention(qkv[0], qkv[1], qkv[2], packing, self.backend)  # (N, H, D)
        return self.to_out(rearrange(out, "n h d -> n (h d)"))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        # Indices 0 (LN), 1 and 4 (Linears) are the reference's state-dict names.
        self.net = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden, dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Transformer(nn.Module):
    """`depth` pre-norm blocks then a LayerNorm; `forward(x (N, E), packing) -> (N, E)`."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_hidden: int, backend: str):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([Attention(dim, heads, dim_head, backend), FeedForward(dim, mlp_hidden)])
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, packing: Packing) -> Tensor:
        for attn, ff in self.layers:
            x = x + attn(x, packing)
            x = x + ff(x)
        return self.norm(x)
