"""Int4 checkpoints of the Thinker decoder: ``quantization_config``, the two published layouts, the repacking.

``config.json`` of Qwen2.5-Omni-7B-AWQ and -GPTQ-Int4 carries a top-level ``quantization_config``;
:func:`read_quantization_config` turns it into a :class:`QuantConfig` and refuses, before any weight is read,
every layout the kernels do not implement (a ValueError naming the field and its value). Only the Thinker
decoder's linears are quantized (:data:`QUANTIZED_MODULES`); embeddings, ``lm_head``, the encoders, the Talker and
Token2Wav stay float.

Each quantized checkpoint Linear (``q_proj`` ... ``down_proj``) stores ``qweight``, ``qzeros``, ``scales`` (GPTQ also
``g_idx``; the names are ``omni_model.weights.QUANTIZED_TENSORS``). :func:`unpack_awq` / :func:`unpack_gptq` read
them into plain (K, N) integer matrices (K = in_features, N = out_features) and :func:`repack` concatenates the
shards of a fused projection (q/k/v, gate/up, in ``omni_model.weights.FUSED_SHARDS`` order) and packs them once
into the layout of ``omni_kernels.w4a16_linear``. docs/quantization.md documents both layouts with their sources:

* AWQ GEMM: ``qweight`` int32 (K, N/8), nibble i of word c is column 8c + (0, 2, 4, 6, 1, 3, 5, 7)[i];
  ``qzeros`` int32 (K/g, N/8) packed the same way; ``scales`` (K/g, N);
  ``W[n, k] = (q[k, n] - z[k // g, n]) * s[k // g, n]``.
* GPTQ v1 (``checkpoint_format`` gptq): ``qweight`` int32 (K/8, N), nibble i of word r is row 8r + i; ``qzeros``
  int32 (K/g, N/8), nibble i of word c is column 8c + i and holds the zero point minus one; ``scales`` (K/g, N);
  ``g_idx`` int32 (K,), the group of each row (not monotonic with ``desc_act``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from omni_kernels.w4a16_linear import KBLOCK, SYMMETRIC_ZERO, pack_w4a16
from omni_model.weights import FUSED_SHARDS, QUANTIZED_TENSORS

__all__ = [
    "AWQ_ORDER",
    "QUANTIZED_MODULES",
    "PackedW4A16",
    "QuantConfig",
    "read_quantization_config",
    "repack",
    "unpack_awq",
    "unpack_gptq",
]

# Our modules that hold the quantized linears, inside each ``thinker.model.layers.N`` (fused ones load the
# checkpoint shards FUSED_SHARDS names).
QUANTIZED_MODULES = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
DECODER_PREFIX = "thinker.model.layers."
# AutoAWQ's WQLinear_GEMM packing: nibble i of a word holds column 8c + AWQ_ORDER[i].
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _refuse(field: str, value: Any, why: str) -> ValueError:
    return ValueError(f"quantization_config.{field} = {value!r}: {why}")


@dataclass(frozen=True)
class QuantConfig:
    """A supported ``quantization_config``: 4-bit weights in groups of ``group_size`` input rows (-1: all of them).

    ``sym``: every zero point is 8 (GPTQ sym). ``desc_act``: GPTQ's act-order, where ``g_idx`` may reorder the
    groups. ``modules_to_not_convert`` (any method, as transformers reads it) / ``modules_in_block_to_quantize``
    (GPTQ) select linears by name.
    """

    method: str  # "awq" | "gptq"
    group_size: int
    sym: bool
    desc_act: bool = False
    modules_to_not_convert: tuple[str, ...] = ()
    modules_in_block_to_quantize: tuple[str, ...] | None = None
    bits: int = 4

    @classmethod
    def from_dict(cls, d: Any) -> QuantConfig:
        """Checks a ``quantization_config`` dict; every unsupported layout is a ValueError naming its field."""
        if not isinstance(d, Mapping):
            raise ValueError(f"quantization_config must be a JSON object, got {type(d).__name__}")
        method = d.get("quant_method")
        if not isinstance(method, str) or method.lower() not in ("awq", "gptq"):
            raise _refuse("quant_method", method, "supported: 'awq' (GEMM) and 'gptq' (v1 checkpoint format)")
        method = method.lower()
        bits = d.get("bits", d.get("w_bit"))
        if bits != 4 or isinstance(bits, bool):
            raise _refuse("bits", bits, "only 4-bit weights are supported")
        group_size = d.get("group_size", d.get("q_group_size", 128))  # transformers' AwqConfig / GPTQConfig default
        if isinstance(group_size, bool) or not isinstance(group_size, int) or not (group_size == -1 or group_size > 0):
            raise _refuse("group_size", group_size, "must be a positive int or -1 (one group per input row span)")
        skip = d.get("modules_to_not_convert") or ()
        if isinstance(skip, str) or not all(isinstance(name, str) for name in skip):
            raise _refuse("modules_to_not_convert", skip, "must be a list of module names")
        config = cls._awq(d, group_size) if method == "awq" else cls._gptq(d, group_size)
        return dataclasses.replace(config, modules_to_not_convert=tuple(skip))

    @classmethod
    def _awq(cls, d: Mapping[str, Any], group_size: int) -> QuantConfig:
        version = d.get("version", "gemm")
        if not isinstance(version, str) or version.lower() != "gemm":
            raise _refuse("version", version, "only AutoAWQ's GEMM packing is supported (not GEMV, GEMV_fast, "
                                              "Marlin, ExLlama or IPEX)")
        if d.get("zero_point", True) is not True:
            raise _refuse("zero_point", d.get("zero_point"), "AWQ GEMM checkpoints without zero points are not "
                                                             "supported")
        backend = d.get("backend", "autoawq")
        if backend not in (None, "autoawq"):
            raise _refuse("backend", backend, "only the AutoAWQ layout is supported (llm-awq packs differently)")
        return cls("awq", group_size, sym=False)

    @classmethod
    def _gptq(cls, d: Mapping[str, Any], group_size: int) -> QuantConfig:
        field = "checkpoint_format" if "checkpoint_format" in d else "format"
        fmt = d.get(field, "gptq")
        if fmt != "gptq":
            raise _refuse(field, fmt, "only the GPTQ v1 layout 'gptq' is supported (not gptq_v2, marlin, bitblas, "
                                      "exllama or other repacked formats)")
        for flag in ("sym", "desc_act"):
            if not isinstance(d.get(flag, flag == "sym"), bool):
                raise _refuse(flag, d.get(flag), "must be true or false")
        if d.get("lm_head", False):
            raise _refuse("lm_head", d.get("lm_head"), "a quantized lm_head is not supported")
        if d.get("pack_dtype", "int32") != "int32":
            raise _refuse("pack_dtype", d.get("pack_dtype"), "only int32 words are supported")
        if d.get("dynamic"):
            raise _refuse("dynamic", d.get("dynamic"), "per-module overrides are not supported")
        blocks = d.get("modules_in_block_to_quantize")
        names = None
        if blocks is not None:
            if not isinstance(blocks, list) or not all(isinstance(b, list) for b in blocks):
                raise _refuse("modules_in_block_to_quantize", blocks, "must be a list of lists of module names")
            names = tuple(n for b in blocks for n in b)
        return cls("gptq", group_size, sym=d.get("sym", True), desc_act=d.get("desc_act", False),
                   modules_in_block_to_quantize=names)

    def to_dict(self) -> dict[str, Any]:
        """The ``quantization_config`` JSON form (what AutoAWQ / GPTQModel write, less their bookkeeping)."""
        if self.method == "awq":
            d = {"quant_method": "awq", "bits": 4, "group_size": self.group_size, "version": "gemm",
                 "zero_point": True}
        else:
            d = {"quant_method": "gptq", "bits": 4, "group_size": self.group_size, "sym": self.sym,
                 "desc_act": self.desc_act, "checkpoint_format": "gptq"}
        if self.modules_in_block_to_quantize is not None:
            d["modules_in_block_to_quantize"] = [list(self.modules_in_block_to_quantize)]
        d["modules_to_not_convert"] = list(self.modules_to_not_convert) or None
        return d

    def group_for(self, in_features: int) -> int:
        """Rows per group of a Linear with ``in_features`` inputs."""
        return in_features if self.group_size == -1 else self.group_size

    def quantizes(self, name: str) -> bool:
        """Whether the checkpoint Linear ``name`` (e.g. ``thinker.model.layers.3.mlp.up_proj``) is quantized: a
        Thinker decoder linear that no ``modules_to_not_convert`` entry names (AutoAWQ: a substring match), and
        that ``modules_in_block_to_quantize`` lists (when given)."""
        if not name.startswith(DECODER_PREFIX):
            return False
        if any(skip in name for skip in self.modules_to_not_convert):
            return False
        if self.modules_in_block_to_quantize is not None:
            return any(name.endswith("." + m) for m in self.modules_in_block_to_quantize)
        return True

    def checkpoint_shapes(self, in_features: int, out_features: int) -> dict[str, tuple[int, ...]]:
        """Shape of each quantized tensor of one checkpoint Linear, by its name suffix."""
        k, n = in_features, out_features
        groups = k // self.group_for(k)
        if self.method == "awq":
            shapes = {"qweight": (k, n // 8), "qzeros": (groups, n // 8), "scales": (groups, n)}
        else:
            shapes = {"qweight": (k // 8, n), "qzeros": (groups, n // 8), "scales": (groups, n), "g_idx": (k,)}
        assert tuple(shapes) == QUANTIZED_TENSORS[self.method]
        return shapes

    def check_model(self, text_config: Any) -> None:
        """Refuses (before any weight is read) a group size or a width that the int4 kernels cannot take, and a
        module selection that splits a fused projection. ``text_config``: the Thinker's ``TextConfig``."""
        t = text_config
        # Input widths (K) are packed in blocks of 32 rows; output widths (N) 8 to a word in both layouts.
        inputs = {"hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size, "o_proj in": t.q_size}
        outputs = {"q_proj out": t.q_size, "k_proj out": t.kv_size, "hidden_size": t.hidden_size,
                   "intermediate_size": t.intermediate_size}
        odd = {name: w for name, w in inputs.items() if w % KBLOCK}
        odd.update({name: w for name, w in outputs.items() if w % 8})
        if odd:
            raise ValueError(f"quantization_config: the int4 layouts need input widths that are multiples of {KBLOCK} "
                             f"and output widths that are multiples of 8; the Thinker has {odd}")
        for name, k in inputs.items():
            g = self.group_for(k)
            if g % KBLOCK or k % g:
                raise _refuse("group_size", self.group_size,
                              f"the int4 kernels need a multiple of {KBLOCK} that divides every quantized input "
                              f"width (Thinker {name} = {k})")
        for layer in range(t.num_hidden_layers):
            for module in QUANTIZED_MODULES:
                parent, attr = module.split(".")
                shards = FUSED_SHARDS.get(attr, (attr,))
                names = [f"{DECODER_PREFIX}{layer}.{parent}.{s}" for s in shards]
                chosen = {n: self.quantizes(n) for n in names}
                if len(set(chosen.values())) > 1:
                    field = ("modules_in_block_to_quantize" if self.modules_in_block_to_quantize is not None
                             else "modules_to_not_convert")
                    raise _refuse(field, list(getattr(self, field)),
                                  f"it quantizes only some of the fused projections {chosen}")


def read_quantization_config(path: str | os.PathLike) -> QuantConfig | None:
    """The checked ``quantization_config`` of ``path/config.json`` (or of that file), None when there is none."""
    file = os.fspath(path)
    if os.path.isdir(file):
        file = os.path.join(file, "config.json")
    with open(file, encoding="utf-8") as fh:
        d = json.load(fh)
    if not isinstance(d, Mapping) or d.get("quantization_config") is None:
        return None
    return QuantConfig.from_dict(d["quantization_config"])


# ----------------------------------------------------------------------------------------------- unpacking


def _nibbles(words: torch.Tensor) -> torch.Tensor:
    """(..., W) int32 -> (..., W, 8) uint8: nibble i is bits 4i..4i+3 (masking after the arithmetic shift drops the
    sign bits of a negative word). One nibble at a time: the transient is one int32 copy, not eight."""
    out = torch.empty(*words.shape, 8, dtype=torch.uint8, device=words.device)
    for i in range(8):
        out[..., i] = ((words >> (4 * i)) & 0xF).to(torch.uint8)
    return out


def unpack_awq(qweight: torch.Tensor, qzeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AWQ GEMM ``qweight`` (K, N/8), ``qzeros`` (G, N/8) int32 -> (q (K, N), z (G, N)) uint8 in column order."""
    reorder = torch.argsort(torch.tensor(AWQ_ORDER)).to(qweight.device)  # column 8c + j sits in nibble reorder[j]

    def columns(words: torch.Tensor) -> torch.Tensor:
        return _nibbles(words)[..., reorder].reshape(words.shape[0], -1)

    return columns(qweight), columns(qzeros)


def unpack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ v1 ``qweight`` (K/8, N), ``qzeros`` (G, N/8) int32 -> (q (K, N), z (G, N)) uint8.

    The v1 format stores each zero point minus one; the stored nibble plus one is the zero point, as AutoGPTQ's and
    ExLlama's kernels read it (so a stored 15, the wrapped -1 of a zero point 0, reads as 16)."""
    q = _nibbles(qweight.t()).reshape(qweight.shape[1], -1).t()  # row 8r + i of column n is nibble i of (r, n)
    z = _nibbles(qzeros).reshape(qzeros.shape[0], -1) + 1
    return q, z


@dataclass
class PackedW4A16:
    """The operands of ``omni_kernels.w4a16_linear`` for one (fused) Linear."""

    qweight: torch.Tensor  # (K/8, N) int32, kernel layout
    scales: torch.Tensor  # (G, N)
    zeros: torch.Tensor | None  # (G, N), or None: 8 everywhere
    perm: torch.Tensor | None  # (K,) int32, or None: rows in order


def _check_dtype(name: str, t: torch.Tensor, dtypes: Sequence[torch.dtype]) -> None:
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"checkpoint tensor {name} must be {names}, got {str(t.dtype).removeprefix('torch.')}")


def _row_order(name: str, g_idx: torch.Tensor, groups: int, group_size: int) -> torch.Tensor | None:
    """The kernel's row order for a GPTQ ``g_idx``: None when it is already ``k // group_size``; else the rows
    sorted by group (stable), which puts every group in one contiguous run when each holds ``group_size`` rows."""
    k = g_idx.numel()
    g_idx = g_idx.long()
    if int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
        raise ValueError(f"checkpoint tensor {name} must hold groups in [0, {groups}), got min {int(g_idx.min())}, "
                         f"max {int(g_idx.max())}")
    if torch.equal(g_idx, torch.arange(k, device=g_idx.device) // group_size):
        return None
    counts = torch.bincount(g_idx, minlength=groups)
    if bool((counts != group_size).any()):
        raise ValueError(f"checkpoint tensor {name}: every group must hold group_size = {group_size} rows for the "
                         f"int4 kernels, got group sizes {counts.tolist()}")
    return torch.argsort(g_idx, stable=True)


def repack(config: QuantConfig, shards: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str], *,
           in_features: int, dtype: torch.dtype) -> PackedW4A16:
    """The checkpoint tensors of one Linear, or of the shards of a fused one in row order, packed for the kernels.

    ``shards``: per checkpoint Linear, its ``qweight``/``qzeros``/``scales`` (/``g_idx``), shapes already checked;
    ``names``: their checkpoint names (for the errors). Scales and zero points are cast to ``dtype`` (the model's;
    exact for fp16 and fp32, a rounding of the fp16 scales for bf16, as vLLM and Marlin do). A symmetric config
    whose zero points are all 8 drops them (``zeros`` None)."""
    group_size = config.group_for(in_features)
    qs, zs, ss, order, order_from = [], [], [], None, None
    for shard, name in zip(shards, names):
        for role in ("qweight", "qzeros"):
            _check_dtype(f"{name}.{role}", shard[role], (torch.int32,))
        _check_dtype(f"{name}.scales", shard["scales"], SCALE_DTYPES)
        unpack = unpack_awq if config.method == "awq" else unpack_gptq
        q, z = unpack(shard["qweight"], shard["qzeros"])
        if config.method == "gptq":
            _check_dtype(f"{name}.g_idx", shard["g_idx"], (torch.int32, torch.int64))
            rows = _row_order(f"{name}.g_idx", shard["g_idx"], z.shape[0], group_size)
            if order_from is not None and not _same_order(rows, order):
                raise ValueError(f"checkpoint tensors {order_from}.g_idx and {name}.g_idx differ: the fused "
                                 "projections share one input and need one row order")
            order, order_from = rows, name
        qs.append(q)
        zs.append(z)
        ss.append(shard["scales"])
    q = torch.cat(qs, 1)
    z = torch.cat(zs, 1)
    if order is not None:
        q = q[order]
    zeros = None if config.sym and bool((z == SYMMETRIC_ZERO).all()) else z.to(dtype)
    return PackedW4A16(qweight=pack_w4a16(q), scales=torch.cat(ss, 1).to(dtype), zeros=zeros,
                       perm=None if order is None else order.to(torch.int32))


def _same_order(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
