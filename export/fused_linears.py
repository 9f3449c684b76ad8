"""Fewer, wider matrix multiplies for the ONNX decoder: per layer, q/k/v as one Linear and the FFN's
gate/up as one Linear.

At batch 1 a decode step is a chain of matrix-vector products, and every one of them costs a kernel
dispatch (and, in onnx-int8, a dynamic quantization of its input) besides its weights. The weights are
concatenated along the output dimension, so each output row keeps its own values: int4 blocks (along the
input dimension) and per-channel int8 scales are exactly those of the separate layers.

Measured and not used for ExecuTorch: on the ~95M irregular model (bench/runtime_models.py) the fused
8da4w .pte decoded no faster (x0.79-1.01 in alternating runs) and the fp32 .pte prefilled 512 tokens
35% slower (0.85-0.90 s -> 1.18-1.21 s), so its exporter keeps the separate projections.
"""

from __future__ import annotations

import torch
from torch import nn


def concatenated(*linears: nn.Linear) -> nn.Linear:
    """One Linear computing all of ``linears`` at once (outputs side by side, in order)."""
    weight = torch.cat([lin.weight for lin in linears])
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=linears[0].bias is not None, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if fused.bias is not None:
        fused.bias = nn.Parameter(torch.cat([lin.bias for lin in linears]), requires_grad=False)
    return fused


class FusedProjections(nn.Module):
    """The fused projections of a model's layers (nn.Identity where a layer has no attention / FFN)."""

    def __init__(self, layers):
        super().__init__()
        self.qkv = nn.ModuleList(
            concatenated(a.q_proj, a.k_proj, a.v_proj) if a else nn.Identity() for a in (lay.self_attn for lay in layers)
        )
        self.gate_up = nn.ModuleList(
            concatenated(m.gate_proj, m.up_proj) if m else nn.Identity() for m in (lay.mlp for lay in layers)
        )

    def project_qkv(self, index: int, attn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer ``index``'s queries, keys and values, [batch, seq, heads*head_dim] each, before RoPE."""
        q_width, kv_width = attn.num_heads * attn.head_dim, attn.num_kv_heads * attn.head_dim
        return self.qkv[index](x).split([q_width, kv_width, kv_width], dim=-1)

    def mlp(self, index: int, mlp, x: torch.Tensor) -> torch.Tensor:
        """Layer ``index``'s FFN (EfficientLLMMLP's math: down(act(gate) * up))."""
        gate, up = self.gate_up[index](x).chunk(2, dim=-1)
        return mlp.down_proj(mlp.act_fn(gate) * up)
