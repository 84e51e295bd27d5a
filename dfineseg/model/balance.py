"""DI-MaskDINO's De-Imbalance module (seed 000; Nan et al., NeurIPS 2024), for the D-FINE decoder.

The paper observes that at the first decoder layer detection lags behind segmentation, and strengthens
detection there with a residual double selection that forms a balance-aware query:
1. the first selection takes more encoder tokens than there are queries (`first_factor` x);
2. token interaction: a few self-attention + FFN layers (residual, post-norm) over those tokens, with a
   position embedding of their boxes; each layer refines the boxes (a zero-initialised delta, so it
   starts as the identity) and is supervised on class and box like the encoder's output;
3. the second selection keeps the `num_queries` best-scoring tokens after interaction: their states and
   boxes start the decoder (the balance-aware query).

Balance-Aware Tokens Optimization (BATO, the paper's second module) then uses that query to refine the
initial feature tokens the decoder attends to (here: the flattened multi-scale memory, the values of the
deformable cross-attention):
4. guiding token generation: an MLP turns the balance-aware query into sparse guiding tokens (one per query),
   with a position embedding of their boxes;
5. token optimisation with guiding: every memory token cross-attends to the guiding tokens and adds the result,
   scaled by a zero-initialised per-channel gain, so the module starts as the identity (a model loaded from
   official weights predicts exactly as before until the gain learns). No FFN over the memory: at 640 px that
   would run on 8400 tokens and cost more than the rest of the module.

Both modules' parts are inference-time parts: they are in the exported graph.
"""

from __future__ import annotations

import torch
from torch import nn


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head scaled dot-product attention of q [B,N,D] over k, v [B,M,D] -> [B,N,D] (no projections)."""
    b, n, d = q.shape
    split = lambda t: t.reshape(b, t.shape[1], heads, d // heads).transpose(1, 2)  # noqa: E731
    attn = ((split(q) * (d // heads) ** -0.5) @ split(k).transpose(-2, -1)).softmax(-1)
    return (attn @ split(v)).transpose(1, 2).reshape(b, n, d)


class TokenInteractionLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.heads = heads
        self.qk = nn.Linear(dim, 2 * dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn)
        self.fc2 = nn.Linear(ffn, dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        q, k = self.qk(x + pos).chunk(2, -1)
        x = self.norm1(x + self.out(attend(q, k, self.v(x), self.heads)))
        return self.norm2(x + self.fc2(torch.relu(self.fc1(x))))


class DeImbalance(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int, layers: int = 2, first_factor: int = 2) -> None:
        super().__init__()
        self.first_factor = int(first_factor)
        self.layers = nn.ModuleList(TokenInteractionLayer(dim, heads, ffn) for _ in range(layers))
        self.pos_head = nn.Sequential(nn.Linear(4, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))
        self.box_head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, 4))
        nn.init.zeros_(self.box_head[-1].weight)
        nn.init.zeros_(self.box_head[-1].bias)
        self.tokens = BalanceAwareTokens(dim, heads)

    def optimize_memory(self, memory: torch.Tensor, query: torch.Tensor, ref_unact: torch.Tensor) -> torch.Tensor:
        """BATO: the decoder's memory refined by the balance-aware query (see the module docstring)."""
        return self.tokens(memory, query, ref_unact, self.pos_head)

    def forward(self, tokens: torch.Tensor, ref_unact: torch.Tensor, score_head: nn.Module, keep: int
                ) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]]]:
        """tokens [B,K1,D], boxes [B,K1,4] (unactivated) -> the `keep` balance-aware tokens, their boxes
        (detached, unactivated) and one {pred_logits, pred_boxes} per interaction layer (for the loss)."""
        x, ref = tokens, ref_unact.detach()
        aux = []
        for layer in self.layers:
            x = layer(x, self.pos_head(ref.sigmoid()))
            new_ref = ref + self.box_head(x)
            aux.append({"pred_logits": score_head(x), "pred_boxes": new_ref.sigmoid()})
            ref = new_ref.detach()
        keep = min(int(keep), int(x.shape[1]))
        idx = aux[-1]["pred_logits"].max(-1).values.topk(keep, dim=1).indices if aux else \
            score_head(x).max(-1).values.topk(keep, dim=1).indices
        x = x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))
        ref = ref.gather(1, idx[..., None].expand(-1, -1, 4))
        return x, ref, aux


class BalanceAwareTokens(nn.Module):
    """BATO: memory [B,N,D] + balance-aware query [B,K,D] with boxes [B,K,4] (unactivated) -> memory [B,N,D]."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.guide = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))  # guiding token generation
        self.guide_norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.gain = nn.Parameter(torch.zeros(dim))  # zero: the identity at initialisation

    def forward(self, memory: torch.Tensor, query: torch.Tensor, ref_unact: torch.Tensor,
                box_pos: nn.Module) -> torch.Tensor:
        guides = self.guide_norm(query + self.guide(query)) + box_pos(ref_unact.detach().sigmoid())
        k, v = self.kv(guides).chunk(2, -1)
        return memory + self.gain * self.out(attend(self.q(memory), k, v, self.heads))
