"""store_kv_cache: write new keys and values into the paged cache (GB/s of bytes moved).

Providers: torch (the reference, index_put), torch.compile of it, triton, cuda. No outside peer is named for
this op; the copy bandwidth measured in the same run is the roofline.
"""

from __future__ import annotations

from functools import partial

import torch

from omni_benchmarks.cases import Case, CaseGroup, compiled_backends, keys, run_groups
from omni_benchmarks.shapes import KV_SHAPES, PAGE_SIZE, STORE_KV_TOKENS, STORE_KV_TOKENS_QUICK
from omni_kernels import store_kv_cache, store_kv_cache_ref
from omni_kernels.testing import Record, bench_main

BENCH = "store_kv_cache"


def providers(dev: torch.device) -> list[str]:
    # Triton on CPU is kept here when the interpreter is on: this bench has always timed every available backend.
    return ["torch", "torch.compile", *compiled_backends(BENCH, dev, cpu_triton=True)]


def _providers(dev, k, v, k_cache, v_cache, slots, compiled) -> dict:
    calls = {
        "torch": lambda: store_kv_cache_ref(k, v, k_cache, v_cache, slots),
        "torch.compile": lambda: compiled(k, v, k_cache, v_cache, slots),
    }
    for backend in providers(dev)[2:]:
        calls[backend] = lambda b=backend: store_kv_cache(k, v, k_cache, v_cache, slots, backend=b)
    return calls


def case_groups(device: str = "cuda", quick: bool = False, preset: str = "qwen2.5-omni-7b") -> list[CaseGroup]:
    """One group per (KV shape, tokens written); the inputs are made when the group is built."""
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    compiled = torch.compile(store_kv_cache_ref)

    def build(shape, num_tokens, label) -> list[Case]:
        num_blocks = max(64, 4 * num_tokens // PAGE_SIZE)
        k = torch.randn(num_tokens, shape.num_kv_heads, shape.head_dim, device=dev, dtype=dtype)
        v = torch.randn_like(k)
        k_cache = torch.zeros(num_blocks, PAGE_SIZE, shape.num_kv_heads, shape.head_dim, device=dev, dtype=dtype)
        v_cache = torch.zeros_like(k_cache)
        slots = torch.randperm(num_blocks * PAGE_SIZE, device=dev)[:num_tokens]
        nbytes = 4 * k.numel() * k.element_size() + slots.numel() * slots.element_size()
        return [Case(BENCH, name, label, dtype, fn, nbytes=nbytes, baseline="torch", rep=20 if quick else 100)
                for name, fn in _providers(dev, k, v, k_cache, v_cache, slots, compiled).items()]

    groups = []
    for shape in KV_SHAPES[preset]:
        for num_tokens in STORE_KV_TOKENS_QUICK if quick else STORE_KV_TOKENS:
            label = f"{shape.name} T={num_tokens} Hk={shape.num_kv_heads} D={shape.head_dim} P={PAGE_SIZE}"
            groups.append(CaseGroup(keys(BENCH, providers(dev), label, dtype),
                                    partial(build, shape, num_tokens, label)))
    return groups


def run(device: str = "cuda", quick: bool = False, preset: str = "qwen2.5-omni-7b") -> list[Record]:
    return run_groups(case_groups(device, quick, preset), device)


if __name__ == "__main__":
    bench_main(run, __doc__)
