"""silu_and_mul: SwiGLU's ``silu(gate) * up`` on the fused gate/up projection output (GB/s).

Shapes: decode steps (T = 1 and 8 tokens) and a 4k-token prefill chunk at the Thinker and Talker MLP widths of the
preset (omni_model.config: 7B Thinker I 18944, Talker I 18944; 3B Thinker 11008, Talker 4864). Bytes: gate_up
(T, 2I) read once and out (T, I) written once: 3 T I elements.

Providers: torch (the reference, which is the model's ``F.silu(gate) * up``: the baseline), torch.compile of it,
triton, cuda. No outside peer is named for this op; vLLM's ``silu_and_mul`` is its analogue.
"""

from __future__ import annotations

import torch

from omni_kernels import available, silu_and_mul, silu_and_mul_ref
from omni_kernels.testing import Record, bench_main, do_bench, make_record, set_speedups
from omni_model.config import OmniConfig

TOKENS = (1, 8, 4096)
TOKENS_QUICK = (1, 8)


def widths(preset: str) -> list[tuple[str, int]]:
    """(models, I) of the preset's Thinker and Talker MLPs, one entry per distinct width."""
    cfg = OmniConfig.preset(preset)
    models: dict[int, list[str]] = {}
    models.setdefault(cfg.thinker_config.text_config.intermediate_size, []).append("thinker")
    models.setdefault(cfg.talker_config.intermediate_size, []).append("talker")
    return [("+".join(names), inter) for inter, names in models.items()]


def _providers(dev, gate_up, compiled) -> dict:
    providers = {
        "torch": lambda: silu_and_mul_ref(gate_up),
        "torch.compile": lambda: compiled(gate_up),
    }
    for backend in available("silu_and_mul", dev):
        if backend == "torch" or (backend == "triton" and dev.type == "cpu"):  # interpreter timings mean nothing
            continue
        providers[backend] = lambda b=backend: silu_and_mul(gate_up, backend=b)
    return providers


def run(device: str = "cuda", quick: bool = False, preset: str = "qwen2.5-omni-7b") -> list[Record]:
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    records = []
    compiled = torch.compile(silu_and_mul_ref)
    for model, inter in widths(preset):
        for num_tokens in TOKENS_QUICK if quick else TOKENS:
            gate_up = torch.randn(num_tokens, 2 * inter, device=dev, dtype=dtype)
            nbytes = 3 * num_tokens * inter * gate_up.element_size()
            label = f"{model} T={num_tokens} I={inter}"
            for name, fn in _providers(dev, gate_up, compiled).items():
                timing = do_bench(fn, device=dev, rep=20 if quick else 100)
                records.append(make_record(bench="silu_and_mul", provider=name, shape=label, dtype=dtype,
                                           device=dev, timing=timing, nbytes=nbytes))
    return set_speedups(records, "torch")


if __name__ == "__main__":
    bench_main(run, __doc__)
