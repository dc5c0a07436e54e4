"""Checkpoint tensor names -> our parameters: the one declared mapping table, and the helper that loads by it.

Our parameter names mirror the checkpoint's under each part's prefix, with two kinds of exceptions:

* fused matmuls (:class:`~omni_model.layers.mlp.MergedLinear`): one parameter built from several checkpoint
  tensors stacked along dim 0, in the order of :data:`FUSED_SHARDS` (weights and biases alike);
* reshaped tensors: a module's ``checkpoint_shapes`` names a parameter stored in another shape with the same
  elements (the ViT's Conv3d patch embedding, ours a Linear over the flattened patch).

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


@dataclass(frozen=True)
class Target:
    """Where one checkpoint tensor goes: rows [start, stop) of parameter ``param`` (all rows when start is None)."""

    param: str
    shape: tuple[int, ...]  # the checkpoint tensor's shape
    start: int | None = None
    stop: int | None = None


def checkpoint_plan(module: nn.Module, prefix: str = "") -> dict[str, Target]:
    """Every checkpoint key ``module`` expects under ``prefix``, with its shape and destination."""
    plan: dict[str, Target] = {}
    for name, mod in module.named_modules():
        attr = name.rsplit(".", 1)[-1]
        fused = isinstance(mod, MergedLinear) and attr in FUSED_SHARDS
        reshaped = getattr(mod, "checkpoint_shapes", {})
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
    for key, target in plan.items():
        dest = params[target.param]
        if target.start is not None:
            dest = dest[target.start : target.stop]
        dest.copy_(found[key].reshape(dest.shape))
