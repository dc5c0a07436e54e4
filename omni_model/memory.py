"""Bytes of every part of a Qwen2.5-Omni model as ``OmniModel.from_pretrained`` builds it, without a GPU.

:func:`model_memory` builds each part on the ``meta`` device exactly as the loader does (the same modules, the int4
Thinker decoder of a quantized checkpoint included, cast to the model dtype, Token2Wav in fp32) and adds up the bytes
of its parameters and buffers; the KV cache is given per token. ``python -m omni_model.memory`` prints the table
(README, "Quantized checkpoints")::

    python -m omni_model.memory --preset qwen2.5-omni-7b            # bf16, AWQ and GPTQ side by side
    python -m omni_model.memory --quant awq --no-audio               # one layout, every part in bytes

What it does not hold: activations, the transient buffers of a step, the CUDA context and allocator slack; the GPU
peak of a real run is measured by ``scripts/int4_peak_memory.py``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch import nn

from omni_model.config import OmniConfig
from omni_model.layers.quant_linear import W4A16Linear, quantize_decoder_
from omni_model.quant import QuantConfig

__all__ = ["MemoryReport", "PUBLISHED_QUANT", "compare_table", "model_memory"]

# The published int4 checkpoints' layouts as our memory figures assume them: group size 128; AWQ keeps a zero point
# per group, symmetric GPTQ none (its zero points are all 8 and the loader drops them).
PUBLISHED_QUANT = {
    "awq": QuantConfig("awq", 128, sym=False),
    "gptq": QuantConfig("gptq", 128, sym=True),
}


def _bytes(*modules: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for m in modules:
        for t in (*m.parameters(), *m.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


@dataclass(frozen=True)
class MemoryReport:
    """``parts``: (name, bytes) in model order; ``kv_per_token``: (decoder, bytes of K and V of one token, all
    layers)."""

    parts: tuple[tuple[str, int], ...]
    kv_per_token: tuple[tuple[str, int], ...]
    dtype: torch.dtype
    quantization: QuantConfig | None

    @property
    def weights(self) -> int:
        return sum(b for _, b in self.parts)

    def kv_bytes(self, thinker_tokens: int, talker_tokens: int = 0) -> int:
        per = dict(self.kv_per_token)
        return thinker_tokens * per.get("thinker", 0) + talker_tokens * per.get("talker", 0)

    def table(self) -> str:
        """A Markdown table of the parts (GiB and bytes), the total, and the KV cache per token."""
        q = self.quantization
        what = "float" if q is None else f"{q.method.upper()} int4, group {q.group_size}"
        lines = [f"| part ({str(self.dtype).removeprefix('torch.')}, Thinker decoder {what}) | GiB | bytes |",
                 "|---|---:|---:|"]
        lines += [f"| {name} | {b / 2**30:.3f} | {b:,} |" for name, b in self.parts]
        lines.append(f"| **weights, total** | **{self.weights / 2**30:.3f}** | **{self.weights:,}** |")
        lines += [f"| KV cache per {name} token | {b / 2**20:.3f} MiB | {b:,} |" for name, b in self.kv_per_token]
        return "\n".join(lines)


def model_memory(config: OmniConfig, quantization: QuantConfig | None = None, *,
                 dtype: torch.dtype = torch.bfloat16, enable_audio_output: bool = True) -> MemoryReport:
    """The bytes of every part of the model ``OmniModel.from_pretrained`` would build for ``config`` (and a
    checkpoint with ``quantization``), in ``dtype``; built on the meta device, so no memory is used."""
    from omni_model.model import PARTS, OmniModel

    if quantization is not None:
        quantization.check_model(config.thinker_config.text_config)
    parts: list[tuple[str, int]] = []
    for name in OmniModel._wanted(enable_audio_output):
        part = PARTS[name]
        with torch.device("meta"):
            module = part.build(config)
        if not part.own_precision:
            if quantization is not None and name == "thinker":
                quantize_decoder_(module.model, quantization)
            module = module.to(dtype)
        if name != "thinker":
            parts.append((name, _bytes(module)))
            continue
        int4 = [m for m in module.model.modules() if isinstance(m, W4A16Linear)]
        linears = [getattr(getattr(layer, p), a) for layer in module.model.layers
                   for p, a in (("self_attn", "qkv_proj"), ("self_attn", "o_proj"), ("mlp", "gate_up_proj"),
                                ("mlp", "down_proj"))]
        label = "int4" if int4 else str(dtype).removeprefix("torch.")
        lm_linears = _bytes(*linears)
        parts += [
            (f"thinker LM decoder linears ({label})", lm_linears),
            ("thinker LM embeddings, norms, lm_head", _bytes(module.model, module.lm_head) - lm_linears),
            ("thinker audio encoder", _bytes(module.audio_tower)),
            ("thinker vision encoder", _bytes(module.visual)),
        ]
    elem = torch.empty((), dtype=dtype).element_size()
    text = config.thinker_config.text_config
    kv = [("thinker", 2 * text.num_hidden_layers * text.kv_size * elem)]
    if enable_audio_output:
        talker = config.talker_config
        kv.append(("talker", 2 * talker.num_hidden_layers * talker.kv_size * elem))
    return MemoryReport(tuple(parts), tuple(kv), dtype, quantization)


def compare_table(config: OmniConfig, *, enable_audio_output: bool = True) -> str:
    """One Markdown table of the float (bf16) model and the published AWQ and GPTQ layouts, in GB (10^9 bytes)."""
    reports = [model_memory(config, q, enable_audio_output=enable_audio_output)
               for q in (None, *PUBLISHED_QUANT.values())]
    lines = ["| part | bf16 | AWQ int4 | GPTQ int4 |", "|---|---:|---:|---:|"]
    for i, (name, _) in enumerate(reports[0].parts):
        label = name.replace(" (bfloat16)", "")
        lines.append(f"| {label} | " + " | ".join(f"{r.parts[i][1] / 1e9:.2f}" for r in reports) + " |")
    lines.append("| **weights, total** | " + " | ".join(f"**{r.weights / 1e9:.2f}**" for r in reports) + " |")
    for name, b in reports[0].kv_per_token:
        lines.append(f"| KV cache per {name} token (MB) | " + " | ".join([f"{b / 1e6:.4f}"] * 3) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen2.5-omni-7b")
    parser.add_argument("--quant", choices=["all", "none", *PUBLISHED_QUANT], default="all",
                        help="one layout (bytes of every part), or 'all': bf16, AWQ and GPTQ side by side")
    parser.add_argument("--no-audio", action="store_true", help="without the Talker and Token2Wav")
    args = parser.parse_args(argv)
    config = OmniConfig.preset(args.preset)
    if args.quant == "all":
        print(compare_table(config, enable_audio_output=not args.no_audio))
        return 0
    report = model_memory(config, None if args.quant == "none" else PUBLISHED_QUANT[args.quant],
                          enable_audio_output=not args.no_audio)
    print(report.table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
