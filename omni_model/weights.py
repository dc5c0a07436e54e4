"""Checkpoint tensor names -> our parameters: the one declared mapping table, and the helper that loads by it.

Our parameter names mirror the checkpoint's under each part's prefix, with two kinds of exceptions:

* fused matmuls (:class:`~omni_model.layers.mlp.MergedLinear`): one parameter built from several checkpoint
  tensors stacked along dim 0, in the order of :data:`FUSED_SHARDS` (weights and biases alike);
* reshaped tensors: a module's ``checkpoint_shapes`` names a parameter stored in another shape with the same
  elements (the ViT's Conv3d patch embedding, ours a Linear over the flattened patch);
* quantized linears (:class:`~omni_model.layers.quant_linear.W4A16Linear`, int4 checkpoints): per checkpoint
  Linear (or shard of a fused one), the tensors :data:`QUANTIZED_TENSORS` names replace ``weight``; the module's
  ``quantized_checkpoint_shapes`` gives their shapes and its ``load_quantized`` repacks them (biases stay float
  parameters, fused like any other).

Loading checks every tensor under the prefix (``omni_model.loader.check_state_dict``): missing, unexpected or
mis-shaped ones are one error naming them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from omni_model.layers.mlp import MergedLinear
from omni_model.loader import check_state_dict

# Fused attribute name -> the checkpoint's shard names, in row order.
FUSED_SHARDS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),  # Qwen2 decoder attention (Thinker, Talker)
    "gate_up_proj": ("gate_proj", "up_proj"),  # SwiGLU MLPs (decoders, ViT blocks)
    "qkv": ("q", "k", "v"),  # ViT attention
    "to_qkv": ("to_q", "to_k", "to_v"),  # Token2Wav DiT attention
}

# quantization_config.quant_method -> the tensors that replace ``weight`` in each quantized checkpoint Linear.
QUANTIZED_TENSORS: dict[str, tuple[str, ...]] = {
    "awq": ("qweight", "qzeros", "scales"),  # AutoAWQ GEMM
    "gptq": ("qweight", "qzeros", "scales", "g_idx"),  # GPTQ v1 (AutoGPTQ / GPTQModel checkpoint_format "gptq")
}


@dataclass(frozen=True)
class Target:
    """Where one checkpoint tensor goes: rows [start, stop) of parameter ``param`` (all rows when start is None)."""

    param: str  # for a quantized tensor: the quantized module's name
    shape: tuple[int, ...]  # the checkpoint tensor's shape
    start: int | None = None
    stop: int | None = None
    quantized: tuple[int, str] | None = None  # (shard index, tensor name) of a quantized linear's tensor


def checkpoint_plan(module: nn.Module, prefix: str = "") -> dict[str, Target]:
    """Every checkpoint key ``module`` expects under ``prefix``, with its shape and destination."""
    plan: dict[str, Target] = {}
    for name, mod in module.named_modules():
        attr = name.rsplit(".", 1)[-1]
        fused = (isinstance(mod, MergedLinear) or hasattr(mod, "quantized_checkpoint_shapes")) and attr in FUSED_SHARDS
        reshaped = getattr(mod, "checkpoint_shapes", {})
        if hasattr(mod, "quantized_checkpoint_shapes"):
            base = name[: len(name) - len(attr)]
            shards = FUSED_SHARDS[attr] if fused else (attr,)
            for i, (shard, shapes) in enumerate(zip(shards, mod.quantized_checkpoint_shapes(), strict=True)):
                for tensor, shape in shapes.items():
                    plan[f"{prefix}{base}{shard}.{tensor}"] = Target(name, shape, quantized=(i, tensor))
        for pname, param in mod.named_parameters(recurse=False):
            ours = f"{name}.{pname}" if name else pname
            if fused:
                base = name[: len(name) - len(attr)]
                if len(FUSED_SHARDS[attr]) != len(mod.output_sizes):
                    raise ValueError(f"{ours}: {len(mod.output_sizes)} output sizes for shards {FUSED_SHARDS[attr]}")
                start = 0
                for shard, size in zip(FUSED_SHARDS[attr], mod.output_sizes):
                    key = f"{prefix}{base}{shard}.{pname}"
                    plan[key] = Target(ours, (size, *param.shape[1:]), start, start + size)
                    start += size
            else:
                plan[prefix + ours] = Target(ours, tuple(reshaped.get(pname, param.shape)))
    return plan


@torch.no_grad()
def load_module(module: nn.Module, state: dict[str, torch.Tensor], prefix: str, *, what: str | None = None) -> None:
    """Copies the tensors of ``state`` whose keys start with ``prefix`` into ``module`` (cast to its dtypes).

    Every key under ``prefix`` must be expected and every expected key present, with the right shape: otherwise
    one :class:`omni_model.loader.CheckpointError` (a ValueError) names them all.
    """
    found = {k: v for k, v in state.items() if k.startswith(prefix)}
    plan = checkpoint_plan(module, prefix)
    check_state_dict({k: t.shape for k, t in plan.items()}, found,
                     what=f"checkpoint part {what or prefix.rstrip('.') or type(module).__name__!r}")
    params = dict(module.named_parameters())
    quantized: dict[str, dict[int, dict[str, tuple[str, torch.Tensor]]]] = {}
    for key, target in plan.items():
        if target.quantized is not None:
            shard, tensor = target.quantized
            quantized.setdefault(target.param, {}).setdefault(shard, {})[tensor] = (key, found[key])
            continue
        dest = params[target.param]
        if target.start is not None:
            dest = dest[target.start : target.stop]
        dest.copy_(found[key].reshape(dest.shape))
    for name, shards in quantized.items():
        ordered = [shards[i] for i in range(len(shards))]
        names = [next(iter(t.values()))[0].rsplit(".", 1)[0] for t in ordered]
        module.get_submodule(name).load_quantized([{k: v for k, (_, v) in t.items()} for t in ordered], names)
