"""Normalisation layers (LayerNorm is torch's own ``nn.LayerNorm``)."""

from __future__ import annotations

import torch
from torch import nn

from omni_kernels import add_rms_norm
from omni_model.layers.backend import get_backend


class RMSNorm(nn.Module):
    """Qwen2 RMSNorm: normalise in fp32, cast back to the input dtype, then scale by ``weight``.

    The order (cast before the weight multiply) is HF's ``Qwen2RMSNorm``; it matters in bf16. Runs the
    ``add_rms_norm`` op (the torch reference is exactly that arithmetic; the fused kernels serve the backends that
    pick them). Shapes: x (..., dim) -> (..., dim).
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed, _ = add_rms_norm(x.reshape(-1, x.shape[-1]), None, self.weight, eps=self.eps, backend=get_backend())
        return normed.view(x.shape)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual add of a pre-norm block, then the norm: (normed, x + residual) for x, residual (T, dim);
        ``residual=None`` (the first block: x is the residual stream) gives (normed x, x)."""
        return add_rms_norm(x, residual, self.weight, eps=self.eps, backend=get_backend())

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"
