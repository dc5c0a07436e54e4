"""add_rms_norm: the residual add and the Qwen2 RMSNorm after it (GB/s).

Shapes: decode steps (T = 1 and 8 tokens) and a 4k-token prefill chunk at the Thinker and Talker widths of the preset
(omni_model.config: 7B Thinker H 3584, Talker H 896), residual given (every norm after the first layer's first).
Bytes: x and residual read once, weight read once, normed and new_residual written once: (4 T H + H) elements.

Providers: torch (the reference, which is the model's ``x + residual`` followed by its RMSNorm module: the baseline),
torch.compile of it, triton, cuda. No outside peer is named for this op; vLLM's ``fused_add_rms_norm`` is its
analogue (in place, same bytes).
"""

from __future__ import annotations

from functools import partial

import torch

from omni_benchmarks.cases import Case, CaseGroup, compiled_backends, keys, run_groups
from omni_kernels import add_rms_norm, add_rms_norm_ref
from omni_kernels.testing import Record, bench_main
from omni_model.config import OmniConfig

BENCH = "add_rms_norm"
TOKENS = (1, 8, 4096)
TOKENS_QUICK = (1, 8)


def widths(preset: str) -> list[tuple[str, int, float]]:
    """(model, H, eps) of the preset's Thinker and Talker decoders."""
    cfg = OmniConfig.preset(preset)
    text, talker = cfg.thinker_config.text_config, cfg.talker_config
    return [("thinker", text.hidden_size, text.rms_norm_eps), ("talker", talker.hidden_size, talker.rms_norm_eps)]


def providers(dev: torch.device) -> list[str]:
    return ["torch", "torch.compile", *compiled_backends(BENCH, dev)]


def _providers(dev, x, res, weight, eps, compiled) -> dict:
    calls = {
        "torch": lambda: add_rms_norm_ref(x, res, weight, eps=eps),
        "torch.compile": lambda: compiled(x, res, weight, eps=eps),
    }
    for backend in providers(dev)[2:]:
        calls[backend] = lambda b=backend: add_rms_norm(x, res, weight, eps=eps, backend=b)
    return calls


def case_groups(device: str = "cuda", quick: bool = False, preset: str = "qwen2.5-omni-7b") -> list[CaseGroup]:
    """One group per (model width, tokens), its inputs made when it is built."""
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    compiled = torch.compile(add_rms_norm_ref)

    def build(hidden, eps, num_tokens, label) -> list[Case]:
        weight = 1 + 0.1 * torch.randn(hidden, device=dev, dtype=dtype)
        x = torch.randn(num_tokens, hidden, device=dev, dtype=dtype)
        res = torch.randn(num_tokens, hidden, device=dev, dtype=dtype)
        nbytes = (4 * num_tokens * hidden + hidden) * x.element_size()
        return [Case(BENCH, name, label, dtype, fn, nbytes=nbytes, baseline="torch", rep=20 if quick else 100)
                for name, fn in _providers(dev, x, res, weight, eps, compiled).items()]

    groups = []
    for model, hidden, eps in widths(preset):
        for num_tokens in TOKENS_QUICK if quick else TOKENS:
            label = f"{model} T={num_tokens} H={hidden}"
            groups.append(CaseGroup(keys(BENCH, providers(dev), label, dtype),
                                    partial(build, hidden, eps, num_tokens, label)))
    return groups


def run(device: str = "cuda", quick: bool = False, preset: str = "qwen2.5-omni-7b") -> list[Record]:
    return run_groups(case_groups(device, quick, preset), device)


if __name__ == "__main__":
    bench_main(run, __doc__)
