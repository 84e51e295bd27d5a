"""DI-MaskDINO's De-Imbalance module (seed 000; Nan et al., NeurIPS 2024), for the D-FINE decoder.

The paper observes that at the first decoder layer detection lags behind segmentation, and strengthens
detection there with a residual double selection that forms a balance-aware query:
1. the first selection takes more encoder tokens than there are queries (`first_factor` x);
2. token interaction: a few self-attention + FFN layers (residual, post-norm) over those tokens, with a
   position embedding of their boxes; each layer refines the boxes (a zero-initialised delta, so it
   starts as the identity) and is supervised on class and box like the encoder's output;
3. the second selection keeps the `num_queries` best-scoring tokens after interaction: their states and
   boxes start the decoder (the balance-aware query).

Its inference-time parts are in the exported graph. Balance-Aware Tokens Optimization (the paper's second
module, which uses this query to refine the decoder's tokens) is not implemented yet.
"""

from __future__ import annotations

import torch
from torch import nn


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
        b, n, d = x.shape
        h = self.heads
        q, k = self.qk(x + pos).reshape(b, n, 2, h, d // h).permute(2, 0, 3, 1, 4)
        v = self.v(x).reshape(b, n, h, d // h).transpose(1, 2)
        attn = (q * (d // h) ** -0.5) @ k.transpose(-2, -1)
        x = self.norm1(x + self.out((attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)))
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
