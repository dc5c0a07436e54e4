"""The int4 Linear of the quantized Thinker decoder (AWQ / GPTQ checkpoints), on ``omni_kernels.w4a16_linear``.

:func:`quantize_decoder_` swaps a decoder's ``qkv_proj``, ``o_proj``, ``gate_up_proj`` and ``down_proj`` for
:class:`W4A16Linear` modules of the same shapes (fused q/k/v and gate/up stay fused, as in the float model);
``omni_model.weights.load_module`` then fills them from the checkpoint's quantized tensors through
:meth:`W4A16Linear.load_quantized`, which repacks them once into the kernels' layout (``omni_model.quant``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from omni_kernels import w4a16_linear
from omni_kernels.w4a16_linear import pack_w4a16
from omni_model.layers.backend import get_backend
from omni_model.quant import DECODER_PREFIX, QUANTIZED_MODULES, QuantConfig, repack
from omni_model.weights import FUSED_SHARDS

# Standard deviation of q - 8 for q uniform in 0..15: sqrt((16^2 - 1) / 12).
_UNIFORM_INT4_STD = math.sqrt(255 / 12)


class W4A16Linear(nn.Module):
    """``x @ W.T + bias`` with W (N, K) held as int4 in groups of ``group_size`` inputs; a fused projection when
    ``output_sizes`` has several entries (rows of the checkpoint Linears ``FUSED_SHARDS`` names, in order).

    Buffers (the operands of ``omni_kernels.w4a16_linear``): ``qweight`` (K/8, N) int32, ``scales`` (G, N) and
    ``zeros`` (G, N) in the model's dtype (``zeros`` None for a symmetric checkpoint), ``perm`` (K,) int32 or None
    (GPTQ ``desc_act``); ``bias`` (N,) a float parameter or None. Shapes: x (..., K) -> (..., N).
    """

    def __init__(self, in_features: int, output_sizes: Sequence[int], *, bias: bool, config: QuantConfig) -> None:
        super().__init__()
        self.in_features = in_features
        self.output_sizes = list(output_sizes)
        self.out_features = sum(self.output_sizes)
        self.config = config
        self.group_size = config.group_for(in_features)
        groups = in_features // self.group_size
        n = self.out_features
        self.register_buffer("qweight", torch.empty(in_features // 8, n, dtype=torch.int32))
        self.register_buffer("scales", torch.empty(groups, n))
        self.register_buffer("zeros", None if config.sym else torch.empty(groups, n))
        self.register_buffer("perm", torch.empty(in_features, dtype=torch.int32) if config.desc_act else None)
        self.bias = nn.Parameter(torch.empty(n)) if bias else None

    @classmethod
    def replacing(cls, linear: nn.Linear, config: QuantConfig) -> W4A16Linear:
        """A placeholder with the shapes of ``linear`` (a ``MergedLinear`` keeps its fused output sizes), on the
        device of its weight (``meta`` while a model is being built)."""
        sizes = getattr(linear, "output_sizes", [linear.out_features])
        with torch.device(linear.weight.device):
            return cls(linear.in_features, sizes, bias=linear.bias is not None, config=config)

    def quantized_checkpoint_shapes(self) -> list[dict[str, tuple[int, ...]]]:
        """Per checkpoint Linear (shard), the shape of each quantized tensor (``omni_model.weights``' plan)."""
        return [self.config.checkpoint_shapes(self.in_features, n) for n in self.output_sizes]

    @torch.no_grad()
    def load_quantized(self, shards: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str]) -> None:
        """Repacks the checkpoint tensors of each shard (``names``: their checkpoint Linears) into the buffers."""
        device = self.scales.device  # the checkpoint may sit on the host: repack where the model lives
        shards = [{name: t.to(device) for name, t in shard.items()} for shard in shards]
        packed = repack(self.config, shards, names, in_features=self.in_features, dtype=self.scales.dtype)
        self.qweight = packed.qweight.to(device)
        self.scales = packed.scales.to(device)
        self.zeros = None if packed.zeros is None else packed.zeros.to(device)
        self.perm = None if packed.perm is None else packed.perm.to(device)

    @torch.no_grad()
    def init_random_(self, *, std: float, generator: torch.Generator) -> None:
        """Random int4 weights (benchmarks, ``OmniModel.from_config``): q uniform in 0..15, zero points 8, scales so
        that W has standard deviation ``std`` (within a factor 1.5 per group), rows in order."""
        device = self.qweight.device
        q = torch.randint(0, 16, (self.in_features, self.out_features), generator=generator, device=device,
                          dtype=torch.int32)
        self.qweight = pack_w4a16(q)
        jitter = torch.rand(self.scales.shape, generator=generator, device=device) + 0.5
        self.scales = (jitter * (std / _UNIFORM_INT4_STD)).to(self.scales.dtype)
        if self.zeros is not None:
            self.zeros.fill_(8)
        if self.perm is not None:
            self.perm = torch.arange(self.in_features, dtype=torch.int32, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = w4a16_linear(x.reshape(-1, self.in_features), self.qweight, self.scales, self.zeros,
                           group_size=self.group_size, perm=self.perm, bias=self.bias, backend=get_backend())
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, output_sizes={self.output_sizes}, group_size={self.group_size}, "
                f"method={self.config.method}, zeros={self.zeros is not None}, perm={self.perm is not None}, "
                f"bias={self.bias is not None}")


def quantize_decoder_(decoder: nn.Module, config: QuantConfig) -> nn.Module:
    """Swaps the Linears of the Thinker decoder ``decoder`` (``thinker.model``: ``layers[i].self_attn`` /
    ``.mlp``) that ``config`` quantizes for :class:`W4A16Linear` placeholders; returns ``decoder``."""
    for i, layer in enumerate(decoder.layers):
        for module in QUANTIZED_MODULES:
            parent_name, attr = module.split(".")
            parent = getattr(layer, parent_name)
            first = FUSED_SHARDS.get(attr, (attr,))[0]
            if config.quantizes(f"{DECODER_PREFIX}{i}.{parent_name}.{first}"):
                setattr(parent, attr, W4A16Linear.replacing(getattr(parent, attr), config))
    return decoder


def init_random_int4_(module: nn.Module, *, std: float | None, generator: torch.Generator) -> None:
    """:meth:`W4A16Linear.init_random_` on every int4 Linear of ``module`` (``std`` None: 1 / sqrt(fan-in), the
    unit-gain init of the benchmarks)."""
    for m in module.modules():
        if isinstance(m, W4A16Linear):
            m.init_random_(std=std if std is not None else m.in_features**-0.5, generator=generator)
