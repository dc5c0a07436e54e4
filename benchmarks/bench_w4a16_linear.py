"""w4a16_linear: the int4 linears of the quantized Thinker decoder (GB/s at decode, TFLOP/s at prefill).

Shapes (the preset's Thinker, group 128): the fused ``qkv_proj``, ``o_proj``, the fused ``gate_up_proj`` and
``down_proj`` (7B: 3584 -> 4608, 3584 -> 3584, 3584 -> 37888, 18944 -> 3584), at M = 1 and 8 rows (decode, the
split-K GEMV) and 2048 (a prefill chunk, the tensor-core GEMM); ``quick`` drops M = 2048. On CPU: small shapes
(K 256, N 512), fp32, M = 1 and 8, and no Triton row (the interpreter's timings mean nothing).

Providers, on the same inputs in one process:

* ``torch``: the reference, dequantize the whole weight then one matmul;
* ``torch.compile``: ``torch.compile`` of that reference;
* ``F.linear``: the float Linear at the same shape and dtype (bf16 on CUDA), the baseline of ``speedup``: what
  int4 must beat at decode (it reads 3.5 times the bytes) and keep up with at prefill;
* ``triton``, ``cuda``: our kernels.

Bytes (``gbps``): what a call must move: the packed weights, scales and zero points (the float weight for
``F.linear``), x and out. FLOPs (``tflops``): 2 M K N. Extra fields: ``weight_mb`` (the weight bytes read) and
``pct_of_spec_bw`` (``gbps`` against the device's published HBM bandwidth).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from omni_benchmarks.cases import Case, CaseGroup, compiled_backends, keys, run_groups
from omni_kernels import w4a16_linear, w4a16_linear_ref
from omni_kernels.testing import Record, bench_main, device_name, spec_for
from omni_kernels.w4a16_linear import dequantize_w4a16, pack_w4a16
from omni_model.config import OmniConfig

BENCH = "w4a16_linear"
BASELINE = "F.linear"
GROUP = 128
ROWS = (1, 8, 2048)
ROWS_QUICK = (1, 8)
CPU_SHAPES = [("cpu-small", 256, 512)]


def shapes(preset: str) -> list[tuple[str, int, int]]:
    """(name, K, N) of the preset's Thinker decoder linears."""
    t = OmniConfig.preset(preset).thinker_config.text_config
    return [("qkv_proj", t.hidden_size, t.q_size + 2 * t.kv_size), ("o_proj", t.q_size, t.hidden_size),
            ("gate_up_proj", t.hidden_size, 2 * t.intermediate_size), ("down_proj", t.intermediate_size, t.hidden_size)]


def _operands(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randint(0, 16, (k, n), generator=g, device=device, dtype=torch.int32)
    args = dict(
        qweight=pack_w4a16(q),
        scales=(torch.rand(k // GROUP, n, generator=g, device=device) * 0.01 + 0.002).to(dtype),
        zeros=torch.randint(0, 16, (k // GROUP, n), generator=g, device=device).to(dtype),
        bias=torch.randn(n, generator=g, device=device).to(dtype),
    )
    x = torch.randn(m, k, generator=g, device=device).to(dtype)
    return x, args


def providers(dev: torch.device) -> list[str]:
    return ["torch", "torch.compile", BASELINE, *compiled_backends(BENCH, dev)]


def _providers(dev: torch.device, x: torch.Tensor, args: dict, weight: torch.Tensor, compiled) -> dict:
    """provider -> (call, weight bytes it reads)."""
    int4_bytes = sum(t.numel() * t.element_size() for t in args.values())
    calls = {
        "torch": (lambda: w4a16_linear_ref(x, group_size=GROUP, **args), int4_bytes),
        "torch.compile": (lambda: compiled(x, group_size=GROUP, **args), int4_bytes),
        BASELINE: (lambda: F.linear(x, weight, args["bias"]), (weight.numel() + weight.shape[0]) * x.element_size()),
    }
    for backend in providers(dev)[3:]:
        calls[backend] = (lambda b=backend: w4a16_linear(x, group_size=GROUP, backend=b, **args), int4_bytes)
    return calls


def case_groups(device: str = "cuda", quick: bool = False, preset: str = "qwen2.5-omni-7b") -> list[CaseGroup]:
    """One group per (linear, M); the operands and the float weight are made when the group is built."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    compiled = torch.compile(w4a16_linear_ref)

    def build(m, k, n, label) -> list[Case]:
        spec = spec_for(device_name(dev)) if cuda else None
        x, args = _operands(m, k, n, dtype, dev)
        # (N, K): the dequantized weight as a float Linear holds it.
        weight = dequantize_w4a16(args["qweight"], args["scales"], args["zeros"], group_size=GROUP).t().contiguous()
        io_bytes = (m * k + m * n) * x.element_size()

        def finish(rec: Record, weight_bytes: float) -> None:
            rec.extra["weight_mb"] = weight_bytes / 1e6
            rec.extra["pct_of_spec_bw"] = 100 * rec.gbps / spec["hbm_gbps"] if spec and rec.gbps else None

        # A provider's failure is a record (catch), not a crash.
        return [Case(BENCH, provider, label, dtype, fn, nbytes=weight_bytes + io_bytes, flops=2 * m * k * n,
                     baseline=BASELINE, finish=partial(finish, weight_bytes=weight_bytes),
                     rep=20 if quick or not cuda else 100, catch=True)
                for provider, (fn, weight_bytes) in _providers(dev, x, args, weight, compiled).items()]

    groups = []
    for name, k, n in shapes(preset) if cuda else CPU_SHAPES:
        for m in (ROWS_QUICK if quick or not cuda else ROWS):
            label = f"{name} M={m} K={k} N={n} g={GROUP}"
            groups.append(CaseGroup(keys(BENCH, providers(dev), label, dtype), partial(build, m, k, n, label)))
    return groups


def run(device: str = "cuda", quick: bool = False, preset: str = "qwen2.5-omni-7b") -> list[Record]:
    return run_groups(case_groups(device, quick, preset), device)


if __name__ == "__main__":
    bench_main(run, __doc__)
