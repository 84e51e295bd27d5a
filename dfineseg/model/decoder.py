"""The D-FINE decoder: query selection, deformable cross-attention with per-level point counts, the gate,
fine-grained distribution refinement (FDR), LQE, per-layer heads, the pre-box head and denoising queries.

Attribute names follow the official `DFINETransformer` so checkpoints load key for key, including its
quirks: `up` / `reg_scale` are non-trainable parameters shared with the inner decoder (so they appear
twice in the state_dict), and `anchors` / `valid_mask` are persistent buffers for 640x640 that we
refresh for the actual input size instead of trusting.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dfineseg.infer.boxes import box_convert
from dfineseg.loss.box_ops import inverse_sigmoid
from dfineseg.loss.denoising import contrastive_denoising_group
from dfineseg.loss.fdr import weighting_function


def prior_bias(prob: float) -> float:
    """Logit bias that makes a fresh sigmoid head output `prob`."""
    return -math.log((1 - prob) / prob)


def distance2bbox(ref: torch.Tensor, dist: torch.Tensor, reg_scale: torch.Tensor) -> torch.Tensor:
    """Edge distances (l, t, r, b, in W units) around a cxcywh reference -> cxcywh box."""
    c = reg_scale.abs()
    cx, cy, w, h = ref.unbind(-1)
    x1 = cx - (0.5 * c + dist[..., 0]) * (w / c)
    y1 = cy - (0.5 * c + dist[..., 1]) * (h / c)
    x2 = cx + (0.5 * c + dist[..., 2]) * (w / c)
    y2 = cy + (0.5 * c + dist[..., 3]) * (h / c)
    return box_convert(torch.stack([x1, y1, x2, y2], -1), "xyxy", "cxcywh")


def mask_anchor_boxes(mask_logits: torch.Tensor, fallback_unact: torch.Tensor, window: float = 2.0) -> torch.Tensor:
    """Boxes around masks (logit > 0), as unactivated normalised cxcywh like `fallback_unact` [B,K,4], which
    is kept where a mask is empty. Plain reductions only, so it exports to ONNX and OpenVINO.

    Only mask pixels inside the token's own box scaled by `window` count: the extent of a thresholded mask
    is ruined by one stray positive pixel, and a model trained from scratch predicts scattered masks for a
    long time (measured: after 600 steps on the hard set 10-18 % of each selected token's mask was on, its
    extent ~90 % of the image; the decoder, whose box distances are relative to that start, then predicted
    zero-width boxes and scored F1 0). Mask DINO's mask-enhanced anchors refine the box; they do not move
    it across the image.
    """
    h, w = mask_logits.shape[-2:]
    ys = torch.arange(h, device=mask_logits.device, dtype=mask_logits.dtype)
    xs = torch.arange(w, device=mask_logits.device, dtype=mask_logits.dtype)
    own = fallback_unact.sigmoid()
    half_w, half_h = (0.5 * window * own[..., 2:3]), (0.5 * window * own[..., 3:4])
    in_x = ((xs + 0.5) / w - own[..., 0:1]).abs() <= half_w  # [B,K,w]
    in_y = ((ys + 0.5) / h - own[..., 1:2]).abs() <= half_h  # [B,K,h]
    on = (mask_logits > 0) & in_y[..., :, None] & in_x[..., None, :]
    rows, cols = on.any(-1), on.any(-2)  # [B,K,h], [B,K,w]
    big = torch.full_like(ys[:1], float(max(h, w)))
    y0 = torch.where(rows, ys, big).amin(-1)
    y1 = torch.where(rows, ys, -big).amax(-1) + 1
    x0 = torch.where(cols, xs, big).amin(-1)
    x1 = torch.where(cols, xs, -big).amax(-1) + 1
    box = torch.stack([(x0 + x1) / (2 * w), (y0 + y1) / (2 * h), (x1 - x0) / w, (y1 - y0) / h], -1)
    box = inverse_sigmoid(box.clamp(1e-4, 1 - 1e-4))
    return torch.where(rows.any(-1, keepdim=True), box, fallback_unact)


def _neighbours(pos: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For pixel coordinates `pos` [..., P] on an axis of `size` [P] pixels: the two neighbouring pixels [..., 2, P],
    clamped into the map (whole numbers, in pos's dtype), and their bilinear weights with zeros padding (a
    neighbour outside the map weighs 0). The pair axis is second to last, not last: ONNX Runtime broadcasts an
    innermost axis of 2 element by element (0.5 ms per operation at S; the points axis keeps runs contiguous)."""
    low = torch.floor(pos)[..., None, :]
    frac = pos[..., None, :] - low
    step = torch.tensor([[0.0], [1.0]], dtype=pos.dtype, device=pos.device)  # [2, 1]
    near = low + step
    inside = torch.clamp(near + 1, 0, 1) * torch.clamp(size - near, 0, 1)  # 1 for 0 <= near <= size-1, else 0
    weight = (frac * step + (1 - frac) * (1 - step)) * inside
    return torch.minimum(torch.clamp(near, min=0), size - 1), weight


def memory_value_maps(memory: torch.Tensor, shapes: list[tuple[int, int]], heads: int) -> list[torch.Tensor]:
    """Per-level cross-attention value maps [B*heads, D/heads, H, W] from token memory [B, sum(HW), D]: what
    training's grid_sample reads when BATO has changed the memory (eval mode reads the memory's rows instead)."""
    b, n, d = memory.shape
    per_level = memory.reshape(b, n, heads, d // heads).permute(0, 2, 3, 1).split([h * w for h, w in shapes], -1)
    return [v.reshape(b * heads, d // heads, h, w) for v, (h, w) in zip(per_level, shapes, strict=True)]


def _level_starts(shapes: list[tuple[int, int]]) -> list[int]:
    """Each level's first token in the flattened memory."""
    starts, at = [], 0
    for h, w in shapes:
        starts.append(at)
        at += h * w
    return starts


def linear_stack_forward(layers: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    """Linear layers with ReLU between them (none after the last): the MLP of every head and the mask
    head's query embedding."""
    last = len(layers) - 1
    for i, layer in enumerate(layers):
        x = layer(x)
        if i < last:
            x = F.relu(x)
    return x


class MLP(nn.Module):
    def __init__(self, cin: int, hidden: int, cout: int, num_layers: int):
        super().__init__()
        dims = [cin] + [hidden] * (num_layers - 1) + [cout]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_stack_forward(self.layers, x)


class MSDeformableAttention(nn.Module):
    """Deformable attention over box references; no value or output projection (as in D-FINE)."""

    def __init__(self, dim: int, heads: int, points: list[int], offset_scale: float = 0.5):
        super().__init__()
        self.heads = heads
        self.points = list(points)
        self.offset_scale = offset_scale
        total = sum(points)
        self.register_buffer(
            "num_points_scale", torch.tensor([1.0 / n for n in points for _ in range(n)], dtype=torch.float32))
        self.sampling_offsets = nn.Linear(dim, heads * total * 2)
        self.attention_weights = nn.Linear(dim, heads * total)
        self._init()

    def _init(self) -> None:
        nn.init.zeros_(self.sampling_offsets.weight)
        # Each head starts looking in its own direction, the k-th point of a level k steps out.
        angles = torch.arange(self.heads, dtype=torch.float32) * (2 * math.pi / self.heads)
        dirs = torch.stack([angles.cos(), angles.sin()], -1)
        dirs = dirs / dirs.abs().max(-1, keepdim=True).values
        steps = torch.cat([torch.arange(1, n + 1) for n in self.points]).float()
        grid = dirs[:, None, :] * steps[None, :, None]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)

    def forward(self, query: torch.Tensor, ref: torch.Tensor, values: list[torch.Tensor] | torch.Tensor,
                shapes: list[tuple[int, int]]) -> torch.Tensor:
        """query [B,Q,D]; ref [B,Q,4] cxcywh; values: per level [B*heads, D/heads, H, W], or the token memory
        [B, sum(HW), D] itself (eval mode: `_gather_rows`)."""
        b, q, _ = query.shape
        total = sum(self.points)
        offsets = self.sampling_offsets(query).reshape(b, q, self.heads, total, 2)
        weights = self.attention_weights(query).reshape(b, q, self.heads, total).softmax(-1)
        scale = self.num_points_scale.to(query.dtype)[:, None]
        ref = ref[:, :, None, None, :]
        locs = ref[..., :2] + offsets * scale * ref[..., 2:] * self.offset_scale
        if isinstance(values, torch.Tensor):
            return self._gather_rows(values, locs, weights, shapes)
        grids = (2 * locs - 1).permute(0, 2, 1, 3, 4).flatten(0, 1)  # [B*heads, Q, total, 2]
        weights = weights.permute(0, 2, 1, 3).reshape(b * self.heads, 1, q, total)
        # Weighted per level and summed, never concatenated: OpenVINO runs a Concat of INT8 samples on its
        # reference kernel (1.8 ms of S's 70 ms; docs/BENCHMARKS.md).
        out = None
        for grid, w, value in zip(grids.split(self.points, dim=2), weights.split(self.points, dim=-1), values, strict=True):
            level = (F.grid_sample(value, grid, mode="bilinear", padding_mode="zeros", align_corners=False) * w).sum(-1)
            out = level if out is None else out + level
        return out.reshape(b, -1, q).transpose(1, 2)  # [B*heads, D/heads, Q] -> [B, Q, D]

    def _gather_rows(self, memory: torch.Tensor, locs: torch.Tensor, weights: torch.Tensor,
                     shapes: list[tuple[int, int]]) -> torch.Tensor:
        """The same bilinear samples (zeros outside, align_corners=False) read as rows of the token memory.

        memory [B, N, D] viewed as a table of [B*N*heads, D/heads] rows (a reshape: row = (b*N + token)*heads +
        head); each sample point's four corners are rows, and the attention-weighted bilinear sum over all
        points and corners is one batched product. Every level in one gather, every head channel of a pixel in
        one contiguous row: GridSample reads a [heads, D/heads, H, W] map a channel plane at a time, which on a
        CPU misses the cache once per channel on the large stride-8 map.
        """
        b, n, d = memory.shape
        heads, ch = self.heads, d // self.heads
        _, q, _, total, _ = locs.shape
        dtype, device = locs.dtype, locs.device
        # Per sample point: its level's width, height and first token (constants of an exported graph).
        per_point = [(w, h, start) for (h, w), start, p in zip(shapes, _level_starts(shapes), self.points, strict=True)
                     for _ in range(p)]
        width = torch.tensor([t[0] for t in per_point], dtype=dtype, device=device)
        height = torch.tensor([t[1] for t in per_point], dtype=dtype, device=device)
        # The two neighbours along each axis on a new axis ([B,Q,heads,2,P]; broadcasting, not stacking: a concat
        # per layer costs OpenVINO ~0.6 ms), each with its bilinear weight, zero when it lies outside the map.
        near_x, weight_x = _neighbours(locs[..., 0] * width - 0.5, width)
        near_y, weight_y = _neighbours(locs[..., 1] * height - 0.5, height)
        # Row of pixel (y, x) of level l, batch b, head h in the [B*N*heads, D/heads] table. Only whole numbers
        # below the map sizes pass through float (exact even in bfloat16 up to 256); the index itself is
        # integer arithmetic (a float index is rounded in reduced precision: docs/BENCHMARKS.md, session 13).
        start = torch.tensor([t[2] for t in per_point], dtype=torch.int32, device=device)
        row_len = torch.tensor([t[0] * heads for t in per_point], dtype=torch.int32, device=device)
        first = ((torch.arange(b, dtype=torch.int32, device=device) * n).reshape(b, 1, 1, 1) + start) * heads
        first = first + torch.arange(heads, dtype=torch.int32, device=device).reshape(1, 1, heads, 1)
        rows = first[..., None, :] + near_y.to(torch.int32) * row_len  # [B,Q,heads,2,P]
        # Each query-head's K = 4P rows and weights, ordered (corner y, corner x, point): one bag per query-head.
        index = (rows[..., :, None, :] + (near_x.to(torch.int32) * heads)[..., None, :, :]).reshape(-1)
        coeff = (weights[..., None, None, :] * weight_y[..., :, None, :] * weight_x[..., None, :, :]).reshape(
            b, q, heads, 1, total * 4)
        picked = memory.reshape(-1, ch).index_select(0, index).reshape(b, q, heads, total * 4, ch)
        return (coeff @ picked).reshape(b, q, d)


class Gate(nn.Module):
    """Learned per-channel mix of the residual and the cross-attention output, then LayerNorm."""

    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Linear(2 * dim, 2 * dim)
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, prior_bias(0.5))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        g1, g2 = torch.sigmoid(self.gate(torch.cat([x, y], -1))).chunk(2, -1)
        return self.norm(g1 * x + g2 * y)


class TransformerDecoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int, points: list[int]):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=0.0, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn = MSDeformableAttention(dim, heads, points)
        self.gateway = Gate(dim)
        self.linear1 = nn.Linear(dim, ffn)
        self.linear2 = nn.Linear(ffn, dim)
        self.norm3 = nn.LayerNorm(dim)
        nn.init.xavier_uniform_(self.linear1.weight)
        nn.init.xavier_uniform_(self.linear2.weight)

    def forward(self, x: torch.Tensor, ref: torch.Tensor, values: list[torch.Tensor], shapes: list[tuple[int, int]],
                attn_mask: torch.Tensor | None, pos: torch.Tensor) -> torch.Tensor:
        q = x + pos
        x = self.norm1(x + self.self_attn(q, q, value=x, attn_mask=attn_mask, need_weights=False)[0])
        x = self.gateway(x, self.cross_attn(x + pos, ref, values, shapes))
        x = x + self.linear2(F.relu(self.linear1(x)))
        # The clamp keeps fp16 training finite (65504 is the fp16 maximum).
        return self.norm3(x.clamp(min=-65504, max=65504))


class LQE(nn.Module):
    """Location quality: statistics of the edge distributions shift every class logit of a query."""

    def __init__(self, k: int, hidden: int, num_layers: int, reg_max: int):
        super().__init__()
        self.k = k
        self.reg_max = reg_max
        self.reg_conf = MLP(4 * (k + 1), hidden, 1, num_layers)
        nn.init.zeros_(self.reg_conf.layers[-1].weight)
        nn.init.zeros_(self.reg_conf.layers[-1].bias)

    def forward(self, logits: torch.Tensor, corners: torch.Tensor) -> torch.Tensor:
        b, q, _ = corners.shape
        prob = corners.reshape(b, q, 4, self.reg_max + 1).softmax(-1)
        top = prob.topk(self.k, dim=-1).values
        stat = torch.cat([top, top.mean(-1, keepdim=True)], -1).reshape(b, q, -1)
        return logits + self.reg_conf(stat)


class TransformerDecoder(nn.Module):
    """The layer stack; holds `up` and `reg_scale` again (shared with the parent, official layout)."""

    def __init__(self, dim: int, heads: int, ffn: int, points: list[int], num_layers: int, reg_max: int,
                 up: nn.Parameter, reg_scale: nn.Parameter):
        super().__init__()
        self.heads = heads
        self.reg_max = reg_max
        self.up = up
        self.reg_scale = reg_scale
        self.layers = nn.ModuleList(TransformerDecoderLayer(dim, heads, ffn, points) for _ in range(num_layers))
        self.lqe_layers = nn.ModuleList(LQE(4, 64, 2, reg_max) for _ in range(num_layers))


class DFINEDecoder(nn.Module):
    """Named `decoder` inside the model; the official `DFINETransformer`."""

    def __init__(self, num_classes: int, hidden_dim: int, feat_channels: list[int], feat_strides: list[int],
                 num_points: list[int], num_layers: int, nhead: int = 8, dim_feedforward: int = 1024,
                 num_queries: int = 300, num_denoising: int = 100, label_noise_ratio: float = 0.5,
                 box_noise_scale: float = 1.0, reg_max: int = 32, reg_scale: float = 4.0,
                 anchor_size: tuple[int, int] = (640, 640), decoder_balance: str = "none"):
        super().__init__()
        if len(num_points) != len(feat_strides):
            raise ValueError("one point count per feature level is needed")
        self.num_classes = num_classes
        self.hidden_dim = hidden_dim
        self.feat_strides = list(feat_strides)
        self.num_levels = len(feat_strides)
        self.num_queries = num_queries
        self.num_denoising = num_denoising
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale
        self.reg_max = reg_max
        self.eps = 1e-2
        self.eval_idx = num_layers - 1

        self.input_proj = nn.ModuleList()
        for c in feat_channels:
            if c == hidden_dim:
                self.input_proj.append(nn.Identity())
            else:
                proj = nn.Sequential()
                proj.add_module("conv", nn.Conv2d(c, hidden_dim, 1, bias=False))
                proj.add_module("norm", nn.BatchNorm2d(hidden_dim))
                nn.init.xavier_uniform_(proj.conv.weight)
                self.input_proj.append(proj)

        self.up = nn.Parameter(torch.tensor([0.5]), requires_grad=False)
        self.reg_scale = nn.Parameter(torch.tensor([float(reg_scale)]), requires_grad=False)
        self.decoder = TransformerDecoder(hidden_dim, nhead, dim_feedforward, num_points, num_layers, reg_max,
                                          self.up, self.reg_scale)
        if num_denoising > 0:
            self.denoising_class_embed = nn.Embedding(num_classes + 1, hidden_dim, padding_idx=num_classes)
            nn.init.normal_(self.denoising_class_embed.weight[:-1])
        self.query_pos_head = MLP(4, 2 * hidden_dim, hidden_dim, 2)
        self.enc_output = nn.Sequential()
        self.enc_output.add_module("proj", nn.Linear(hidden_dim, hidden_dim))
        self.enc_output.add_module("norm", nn.LayerNorm(hidden_dim))
        self.enc_score_head = nn.Linear(hidden_dim, num_classes)
        self.enc_bbox_head = MLP(hidden_dim, hidden_dim, 4, 3)
        self.dec_score_head = nn.ModuleList(nn.Linear(hidden_dim, num_classes) for _ in range(num_layers))
        self.pre_bbox_head = MLP(hidden_dim, hidden_dim, 4, 3)
        self.dec_bbox_head = nn.ModuleList(
            MLP(hidden_dim, hidden_dim, 4 * (reg_max + 1), 3) for _ in range(num_layers))

        shapes = [(anchor_size[0] // s, anchor_size[1] // s) for s in self.feat_strides]
        anchors, valid = self.generate_anchors(shapes)
        self.register_buffer("anchors", anchors)
        self.register_buffer("valid_mask", valid)
        self._init()
        if decoder_balance not in ("none", "di"):
            raise ValueError(f"decoder_balance must be 'none' or 'di', got {decoder_balance!r}")
        # DI-MaskDINO's De-Imbalance module (dfineseg/model/balance.py); registered last and only when on, so
        # the official keys and their order stay as they are.
        self.balance = None
        if decoder_balance == "di":
            from dfineseg.model.balance import DeImbalance

            self.balance = DeImbalance(hidden_dim, nhead, dim_feedforward)

    def _init(self) -> None:
        cls_bias = prior_bias(0.01)
        nn.init.constant_(self.enc_score_head.bias, cls_bias)
        for head in (self.enc_bbox_head, self.pre_bbox_head, *self.dec_bbox_head):
            nn.init.zeros_(head.layers[-1].weight)
            nn.init.zeros_(head.layers[-1].bias)
        for head in self.dec_score_head:
            nn.init.constant_(head.bias, cls_bias)
        nn.init.xavier_uniform_(self.enc_output.proj.weight)
        nn.init.xavier_uniform_(self.query_pos_head.layers[0].weight)
        nn.init.xavier_uniform_(self.query_pos_head.layers[1].weight)

    def class_dependent_keys(self, prefix: str = "decoder.") -> list[str]:
        keys = [f"{prefix}enc_score_head.weight", f"{prefix}enc_score_head.bias"]
        for i in range(len(self.dec_score_head)):
            keys += [f"{prefix}dec_score_head.{i}.weight", f"{prefix}dec_score_head.{i}.bias"]
        if self.num_denoising > 0:
            keys.append(f"{prefix}denoising_class_embed.weight")
        return keys

    # ------------------------------------------------------------------ geometry
    def generate_anchors(self, shapes: list[tuple[int, int]], device: torch.device | None = None,
                         dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Anchor logits [1, sum(h*w), 4] (inf where invalid) and the valid mask [1, sum(h*w), 1]."""
        parts = []
        for level, (h, w) in enumerate(shapes):
            ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h
            xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w
            gy, gx = torch.meshgrid(ys, xs, indexing="ij")
            wh = torch.full_like(gx, 0.05 * 2.0 ** level)
            parts.append(torch.stack([gx, gy, wh, wh], -1).reshape(1, h * w, 4))
        anchors = torch.cat(parts, 1)
        valid = ((anchors > self.eps) & (anchors < 1 - self.eps)).all(-1, keepdim=True)
        logits = torch.log(anchors / (1 - anchors))
        logits = torch.where(valid, logits, torch.full_like(logits, float("inf")))
        return logits.to(dtype), valid

    def _flatten(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]], list[torch.Tensor]]:
        """-> (memory [B, sum(HW), D] tokens, per-level (H, W), the projected per-level maps [B, D, H, W])."""
        tokens, shapes, maps = [], [], []
        for proj, f in zip(self.input_proj, feats, strict=True):
            f = proj(f)
            maps.append(f)
            shapes.append((int(f.shape[2]), int(f.shape[3])))
            tokens.append(f.flatten(2).transpose(1, 2))
        return torch.cat(tokens, 1), shapes, maps

    def _head_values(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """Cross-attention values, one [B*heads, D/heads, H, W] map per level, straight from the projected
        [B, D, H, W] maps: a reshape only (channel = head * D/heads + c, the order the token layout splits).
        Rebuilding them from the flattened memory instead costs a transpose of every token, which OpenVINO
        runs in f32 even in INT8 (2.3 ms of S's 70 ms; docs/BENCHMARKS.md)."""
        heads = self.decoder.heads
        return [m.reshape(m.shape[0] * heads, m.shape[1] // heads, m.shape[2], m.shape[3]) for m in maps]


    # ------------------------------------------------------------------ forward
    def forward(self, feats: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None,
                select_masks: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """-> (D-FINE output dict, extras).

        extras: `hidden` [L',B,Q',D] query states of the layers that produced outputs (every layer in
        training, the last one in eval), `enc_memory` [B,Q,D] selected encoder states (training),
        `dn_split` (denoising split or None).
        """
        memory, shapes, maps = self._flatten(feats)
        # Tiny inputs can have fewer tokens than queries.
        topk = min(self.num_queries, int(memory.shape[1]))
        if self.training and self.num_denoising > 0 and targets is not None:
            dn_content, dn_ref, attn_mask, dn_meta = contrastive_denoising_group(
                targets, self.num_classes, topk, self.denoising_class_embed, self.num_denoising,
                self.label_noise_ratio, self.box_noise_scale)
        else:
            dn_content = dn_ref = attn_mask = dn_meta = None

        # Anchors are built for the actual feature sizes (the `anchors` buffer only mirrors the official
        # 640x640 layout for checkpoint compatibility).
        anchors, valid = self.generate_anchors(shapes, memory.device, memory.dtype)
        # Only query selection sees the masked memory; the cross-attention values stay unmasked (official).
        enc_mem = self.enc_output(valid.to(memory.dtype) * memory)
        enc_logits = self.enc_score_head(enc_mem)
        first = topk if self.balance is None else min(self.balance.first_factor * topk, int(memory.shape[1]))
        idx = enc_logits.max(-1).values.topk(first, dim=1).indices
        sel_mem = enc_mem.gather(1, idx[..., None].expand(-1, -1, enc_mem.shape[-1]))
        sel_anchor = anchors.expand(memory.shape[0], -1, -1).gather(1, idx[..., None].expand(-1, -1, 4))
        enc_ref_unact = self.enc_bbox_head(sel_mem) + sel_anchor

        content = sel_mem.detach()
        ref_unact = enc_ref_unact.detach()
        balance_aux: list[dict[str, torch.Tensor]] = []
        if self.balance is not None:  # the balance-aware query: interaction, then the second selection
            content, ref_unact, balance_aux = self.balance(content, ref_unact, self.enc_score_head, topk)
            memory = self.balance.optimize_memory(memory, content, ref_unact)  # BATO: the values the decoder reads
        # Eval mode samples rows of the token memory itself (MSDeformableAttention._gather_rows); training keeps
        # grid_sample over per-level maps, so trained weights never depend on the deployment form.
        if not self.training:
            values: list[torch.Tensor] | torch.Tensor = memory
        elif self.balance is not None:
            values = memory_value_maps(memory, shapes, self.decoder.heads)
        else:
            values = self._head_values(maps)
        if select_masks is not None:
            # Mask DINO's mask-enhanced anchor boxes (seed 001): the selected tokens' masks (`select_masks`:
            # states -> mask logits [B,K,h,w]) give the decoder's initial boxes; an empty mask keeps its box.
            ref_unact = mask_anchor_boxes(select_masks(content).detach(), ref_unact)
        if dn_content is not None:
            content = torch.cat([dn_content, content], 1)
            ref_unact = torch.cat([dn_ref, ref_unact], 1)

        layers = self._run_layers(content, ref_unact, values, shapes, attn_mask)
        out, extras = self._assemble(layers, dn_meta)
        if self.training:
            sel_logits = enc_logits.gather(1, idx[..., None].expand(-1, -1, enc_logits.shape[-1]))
            # The encoder's selection, then (decoder_balance=di) each token-interaction layer, supervised alike.
            out["enc_aux_outputs"] = [{"pred_logits": sel_logits, "pred_boxes": enc_ref_unact.sigmoid()},
                                      *balance_aux]
            out["enc_meta"] = {"class_agnostic": False}
            extras["enc_memory"] = sel_mem
        return out, extras

    def _run_layers(self, target: torch.Tensor, ref_unact: torch.Tensor, values: list[torch.Tensor],
                    shapes: list[tuple[int, int]], attn_mask: torch.Tensor | None) -> dict[str, Any]:
        """`values`: the cross-attention values, one [B*heads, D/heads, H, W] map per level (training), or the
        token memory [B, N, D] whose rows eval mode samples (MSDeformableAttention._gather_rows)."""
        dec = self.decoder
        project = weighting_function(self.reg_max, self.up, self.reg_scale)

        ref = ref_unact.sigmoid()
        x = target
        prev_state: torch.Tensor | float = 0.0
        prev_corners: torch.Tensor | float = 0.0
        res: dict[str, Any] = {"logits": [], "boxes": [], "corners": [], "refs": [], "hidden": []}
        last = len(dec.layers) - 1
        for i, layer in enumerate(dec.layers):
            pos = self.query_pos_head(ref).clamp(min=-10, max=10)
            x = layer(x, ref, values, shapes, attn_mask, pos)
            if i == 0:
                # Pre-box: one residual step on the encoder reference, the fixed origin of every FDR layer.
                pre_boxes = torch.sigmoid(self.pre_bbox_head(x) + inverse_sigmoid(ref))
                res["pre_logits"] = self.dec_score_head[0](x)
                res["pre_boxes"] = pre_boxes
                origin = pre_boxes.detach()
            corners = self.dec_bbox_head[i](x + prev_state) + prev_corners
            probs = corners.reshape(*corners.shape[:-1], 4, self.reg_max + 1).softmax(-1)
            boxes = distance2bbox(origin, probs @ project, self.reg_scale)
            if self.training or i == last:
                logits = dec.lqe_layers[i](self.dec_score_head[i](x), corners)
                res["logits"].append(logits)
                res["boxes"].append(boxes)
                res["corners"].append(corners)
                res["refs"].append(origin)
                res["hidden"].append(x)
            prev_corners = corners
            ref = boxes.detach()
            prev_state = x.detach()
        return res

    def _assemble(self, res: dict[str, Any], dn_meta: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
        stacks = {k: torch.stack(res[k]) for k in ("logits", "boxes", "corners", "refs", "hidden")}
        pre_logits, pre_boxes = res["pre_logits"], res["pre_boxes"]
        split = None
        dn: dict[str, torch.Tensor] = {}
        if self.training and dn_meta is not None:
            split = dn_meta["dn_num_split"]
            for k, v in stacks.items():
                dn[k], stacks[k] = v.split(split, dim=2)
            dn["pre_logits"], pre_logits = pre_logits.split(split, dim=1)
            dn["pre_boxes"], pre_boxes = pre_boxes.split(split, dim=1)

        out: dict[str, Any] = {"pred_logits": stacks["logits"][-1], "pred_boxes": stacks["boxes"][-1]}
        extras: dict[str, Any] = {"hidden": stacks["hidden"], "dn_split": split}
        if not self.training:
            return out, extras
        out.update({"pred_corners": stacks["corners"][-1], "ref_points": stacks["refs"][-1],
                    "up": self.up, "reg_scale": self.reg_scale})
        out["aux_outputs"] = _layer_dicts(stacks, last_teacher=True, drop_last=True)
        out["pre_outputs"] = {"pred_logits": pre_logits, "pred_boxes": pre_boxes}
        if dn_meta is not None:
            if dn:
                out["dn_outputs"] = _layer_dicts(dn, last_teacher=True, drop_last=False)
                out["dn_pre_outputs"] = {"pred_logits": dn["pre_logits"], "pred_boxes": dn["pre_boxes"]}
                extras["dn_hidden"] = dn["hidden"]
            out["dn_meta"] = dn_meta
        return out, extras


def _layer_dicts(stacks: dict[str, torch.Tensor], last_teacher: bool, drop_last: bool) -> list[dict[str, Any]]:
    n = stacks["logits"].shape[0] - (1 if drop_last else 0)
    teacher_corners = stacks["corners"][-1] if last_teacher else None
    teacher_logits = stacks["logits"][-1] if last_teacher else None
    return [
        {"pred_logits": stacks["logits"][i], "pred_boxes": stacks["boxes"][i], "pred_corners": stacks["corners"][i],
         "ref_points": stacks["refs"][i], "teacher_corners": teacher_corners, "teacher_logits": teacher_logits}
        for i in range(n)
    ]
