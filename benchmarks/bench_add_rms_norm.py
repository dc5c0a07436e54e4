"""add_rms_norm: the residual add and the Qwen2 RMSNorm after it (GB/s).

Shapes: decode steps (T = 1 and 8 tokens) and a 4k-token prefill chunk at the Thinker and Talker widths of the preset
(omni_model.config: 7B Thinker H 3584, Talker H 896), residual given (every norm after the first layer's first).
Bytes: x and residual read once, weight read once, normed and new_residual written once: (4 T H + H) elements.

Providers: torch (the reference, which is the model's ``x + residual`` followed by its RMSNorm module: the baseline),
torch.compile of it, triton, cuda. No outside peer is named for this op; vLLM's ``fused_add_rms_norm`` is its
analogue (in place, same bytes).
"""

from __future__ import annotations

import torch

from omni_kernels import add_rms_norm, add_rms_norm_ref, available
from omni_kernels.testing import Record, bench_main, do_bench, make_record, set_speedups
from omni_model.config import OmniConfig

TOKENS = (1, 8, 4096)
TOKENS_QUICK = (1, 8)


def widths(preset: str) -> list[tuple[str, int, float]]:
    """(model, H, eps) of the preset's Thinker and Talker decoders."""
    cfg = OmniConfig.preset(preset)
    text, talker = cfg.thinker_config.text_config, cfg.talker_config
    return [("thinker", text.hidden_size, text.rms_norm_eps), ("talker", talker.hidden_size, talker.rms_norm_eps)]


def _providers(dev, x, res, weight, eps, compiled) -> dict:
    providers = {
        "torch": lambda: add_rms_norm_ref(x, res, weight, eps=eps),
        "torch.compile": lambda: compiled(x, res, weight, eps=eps),
    }
    for backend in available("add_rms_norm", dev):
        if backend == "torch" or (backend == "triton" and dev.type == "cpu"):  # interpreter timings mean nothing
            continue
        providers[backend] = lambda b=backend: add_rms_norm(x, res, weight, eps=eps, backend=b)
    return providers


def run(device: str = "cuda", quick: bool = False, preset: str = "qwen2.5-omni-7b") -> list[Record]:
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    records = []
    compiled = torch.compile(add_rms_norm_ref)
    for model, hidden, eps in widths(preset):
        weight = 1 + 0.1 * torch.randn(hidden, device=dev, dtype=dtype)
        for num_tokens in TOKENS_QUICK if quick else TOKENS:
            x = torch.randn(num_tokens, hidden, device=dev, dtype=dtype)
            res = torch.randn(num_tokens, hidden, device=dev, dtype=dtype)
            nbytes = (4 * num_tokens * hidden + hidden) * x.element_size()
            label = f"{model} T={num_tokens} H={hidden}"
            for name, fn in _providers(dev, x, res, weight, eps, compiled).items():
                timing = do_bench(fn, device=dev, rep=20 if quick else 100)
                records.append(make_record(bench="add_rms_norm", provider=name, shape=label, dtype=dtype,
                                           device=dev, timing=timing, nbytes=nbytes))
    return set_speedups(records, "torch")


if __name__ == "__main__":
    bench_main(run, __doc__)
