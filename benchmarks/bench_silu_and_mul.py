"""silu_and_mul: SwiGLU's ``silu(gate) * up`` on the fused gate/up projection output (GB/s).

Shapes: decode steps (T = 1 and 8 tokens) and a 4k-token prefill chunk at the Thinker and Talker MLP widths of the
preset (omni_model.config: 7B Thinker I 18944, Talker I 18944; 3B Thinker 11008, Talker 4864). Bytes: gate_up
(T, 2I) read once and out (T, I) written once: 3 T I elements.

Providers: torch (the reference, which is the model's ``F.silu(gate) * up``: the baseline), torch.compile of it,
triton, cuda. No outside peer is named for this op; vLLM's ``silu_and_mul`` is its analogue.
"""

from __future__ import annotations

from functools import partial

import torch

from omni_benchmarks.cases import Case, CaseGroup, compiled_backends, keys, run_groups
from omni_kernels import silu_and_mul, silu_and_mul_ref
from omni_kernels.testing import Record, bench_main
from omni_model.config import OmniConfig

BENCH = "silu_and_mul"
TOKENS = (1, 8, 4096)
TOKENS_QUICK = (1, 8)


def widths(preset: str) -> list[tuple[str, int]]:
    """(models, I) of the preset's Thinker and Talker MLPs, one entry per distinct width."""
    cfg = OmniConfig.preset(preset)
    models: dict[int, list[str]] = {}
    models.setdefault(cfg.thinker_config.text_config.intermediate_size, []).append("thinker")
    models.setdefault(cfg.talker_config.intermediate_size, []).append("talker")
    return [("+".join(names), inter) for inter, names in models.items()]


def providers(dev: torch.device) -> list[str]:
    return ["torch", "torch.compile", *compiled_backends(BENCH, dev)]


def _providers(dev, gate_up, compiled) -> dict:
    calls = {
        "torch": lambda: silu_and_mul_ref(gate_up),
        "torch.compile": lambda: compiled(gate_up),
    }
    for backend in providers(dev)[2:]:
        calls[backend] = lambda b=backend: silu_and_mul(gate_up, backend=b)
    return calls


def case_groups(device: str = "cuda", quick: bool = False, preset: str = "qwen2.5-omni-7b") -> list[CaseGroup]:
    """One group per (MLP width, tokens), its input made when it is built."""
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    compiled = torch.compile(silu_and_mul_ref)

    def build(inter, num_tokens, label) -> list[Case]:
        gate_up = torch.randn(num_tokens, 2 * inter, device=dev, dtype=dtype)
        nbytes = 3 * num_tokens * inter * gate_up.element_size()
        return [Case(BENCH, name, label, dtype, fn, nbytes=nbytes, baseline="torch", rep=20 if quick else 100)
                for name, fn in _providers(dev, gate_up, compiled).items()]

    groups = []
    for model, inter in widths(preset):
        for num_tokens in TOKENS_QUICK if quick else TOKENS:
            label = f"{model} T={num_tokens} I={inter}"
            groups.append(CaseGroup(keys(BENCH, providers(dev), label, dtype),
                                    partial(build, inter, num_tokens, label)))
    return groups


def run(device: str = "cuda", quick: bool = False, preset: str = "qwen2.5-omni-7b") -> list[Record]:
    return run_groups(case_groups(device, quick, preset), device)


if __name__ == "__main__":
    bench_main(run, __doc__)
