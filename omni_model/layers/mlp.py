"""Feed-forward layers: the gated (SwiGLU) MLP of the Qwen2 decoders and the ViT, with a fused gate/up matmul."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from omni_kernels import silu_and_mul
from omni_model.layers.backend import get_backend

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,  # exact (erf) GELU: HF's "gelu"
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


def activation(name: str):
    """The activation function HF calls ``name`` (ACT2FN)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class MergedLinear(nn.Linear):
    """A Linear whose output rows are several checkpoint tensors stacked (``output_sizes`` rows each, in order).

    One matmul instead of several (fused q/k/v, fused gate/up); ``omni_model.weights`` fills the row ranges
    from the checkpoint's separate tensors.
    """

    def __init__(self, in_features: int, output_sizes: list[int], *, bias: bool) -> None:
        super().__init__(in_features, sum(output_sizes), bias=bias)
        self.output_sizes = list(output_sizes)


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` with gate and up fused in one Linear ``gate_up_proj`` (rows: gate, then up).

    The checkpoint's ``gate_proj`` / ``up_proj`` are concatenated into ``gate_up_proj`` at load time
    (``omni_model.weights``). Shapes: x (..., hidden) -> (..., hidden).
    """

    def __init__(self, hidden: int, intermediate: int, *, bias: bool = False, act: str = "silu") -> None:
        super().__init__()
        self.intermediate = intermediate
        self.gate_up_proj = MergedLinear(hidden, [intermediate, intermediate], bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.act is F.silu:  # SwiGLU: the fused op (its torch reference is the line below)
            hidden = silu_and_mul(gate_up.reshape(-1, gate_up.shape[-1]), backend=get_backend())
            return self.down_proj(hidden.view(*gate_up.shape[:-1], self.intermediate))
        gate, up = gate_up.split(self.intermediate, dim=-1)
        return self.down_proj(self.act(gate) * up)
