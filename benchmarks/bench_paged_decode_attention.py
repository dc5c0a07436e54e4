"""paged_decode_attention (GB/s) and paged_prefill_attention (TFLOP/s) at the Thinker's shapes.

Decode: one new token per sequence over 1k..32k cached tokens, batch 1 and 8, the 7B thinker's attention
(Hq 28, Hk 4, D 128; docs/model.md), bf16, P = 16, blocks in random page order. Bytes counted: the K and V rows
that must be read (2 * B * ctx * Hk * D * 2) plus q and the output; the records also give GB/s as a percentage
of the device-to-device copy bandwidth measured in the same run (``pct_of_copy_bw``) and of the spec figure.
Prefill: 2k new tokens over 0 and 6k cached tokens (batch 1); flops counted for the causal pairs only:
4 * Hq * D * sum over new tokens of the keys they see.

Providers: sdpa-contiguous (the peer and the speedup baseline: F.scaled_dot_product_attention over a contiguous
(B, Hk, ctx, D) cache with enable_gqa, bottom-right causal for prefill; the cache layout a non-paged engine
would hold), torch (the reference: per-sequence gather, fp32 maths), torch.compile of the reference (CUDA only:
inductor's CPU compile would take longer than the whole quick suite), triton, cuda.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from omni_benchmarks.cases import Case, CaseGroup, compiled_backends, keys, run_groups
from omni_benchmarks.shapes import PAGE_SIZE
from omni_kernels import (
    paged_decode_attention,
    paged_decode_attention_ref,
    paged_prefill_attention,
    paged_prefill_attention_ref,
)
from omni_kernels.testing import Record, bench_main, copy_bandwidth_gbps, spec_for

BASELINE = "sdpa-contiguous"
# (Hq, Hk, D) of the thinker's attention per preset.
THINKER_HEADS = {"qwen2.5-omni-7b": ("thinker-7b", 28, 4, 128), "qwen2.5-omni-3b": ("thinker-3b", 16, 2, 128)}
DECODE_CONTEXTS = (1024, 2048, 4096, 8192, 16384, 32768)
DECODE_BATCHES = (1, 8)
PREFILL = ((2048, 0), (2048, 6144))  # (new tokens, cached tokens before them)
DECODE_CONTEXTS_QUICK = (128, 512)
DECODE_BATCHES_QUICK = (1, 2)
PREFILL_QUICK = ((64, 0), (64, 192))


def paged_layout(contexts, num_kv_heads, head_dim, page, dtype, device, seed=0):
    """Random K/V in random page order; returns (k_cache, v_cache, block_tables, contiguous K, contiguous V) with
    the contiguous copies (B, Hk, max ctx, D) for the SDPA peer (zero-padded past each context)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    need = [-(-c // page) for c in contexts]
    num_blocks = sum(need)
    perm = torch.randperm(num_blocks, generator=g).to(device)
    block_tables = torch.zeros(len(contexts), max(need), dtype=torch.int32, device=device)
    k_cache = torch.empty(num_blocks, page, num_kv_heads, head_dim, dtype=dtype, device=device)
    v_cache = torch.empty_like(k_cache)
    longest = max(contexts)
    k_dense = torch.zeros(len(contexts), num_kv_heads, longest, head_dim, dtype=dtype, device=device)
    v_dense = torch.zeros_like(k_dense)
    used = 0
    for b, (c, nb) in enumerate(zip(contexts, need)):
        blocks = perm[used: used + nb]
        used += nb
        block_tables[b, :nb] = blocks.int()
        k = torch.randn(c, num_kv_heads, head_dim, dtype=dtype, device=device)
        v = torch.randn(c, num_kv_heads, head_dim, dtype=dtype, device=device)
        t = torch.arange(c, device=device)
        k_cache[blocks[t // page], t % page] = k
        v_cache[blocks[t // page], t % page] = v
        k_dense[b, :, :c] = k.transpose(0, 1)
        v_dense[b, :, :c] = v.transpose(0, 1)
    return k_cache, v_cache, block_tables, k_dense, v_dense


def sdpa_fn(q, k, v, **kwargs):
    """The SDPA call to time: the GQA group shared (enable_gqa, torch >= 2.5) where this torch supports it for
    these arguments, else K/V repeated per query head once, outside the timed region."""
    try:
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs)
        return lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs)
    except (TypeError, RuntimeError):
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        return lambda: F.scaled_dot_product_attention(q, k, v, **kwargs)


def providers(op: str, dev: torch.device) -> list[str]:
    """The peer (the baseline), the reference, its torch.compile (CUDA only: inductor's CPU compile would take longer
    than the whole quick suite), then our compiled backends."""
    return [BASELINE, "torch", *(["torch.compile"] if dev.type == "cuda" else []), *compiled_backends(op, dev)]


def _providers(op, front, ref, compiled, peer, args, dev) -> dict:
    calls = {BASELINE: peer, "torch": lambda: ref(*args)}
    if compiled is not None:
        calls["torch.compile"] = lambda: compiled(*args)
    for backend in compiled_backends(op, dev):
        calls[backend] = lambda b=backend: front(*args, backend=b)
    return calls


def _decode_label(heads, batch: int, ctx: int) -> str:
    name, num_q_heads, num_kv_heads, head_dim = heads
    return f"decode {name} B={batch} ctx={ctx} Hq={num_q_heads} Hk={num_kv_heads} D={head_dim} P={PAGE_SIZE}"


def _prefill_label(heads, new: int, cached: int) -> str:
    name, num_q_heads, num_kv_heads, head_dim = heads
    return (f"prefill {name} new={new} cached={cached} Hq={num_q_heads} Hk={num_kv_heads} D={head_dim} "
            f"P={PAGE_SIZE}")


def _device_figures(dev: torch.device) -> tuple[float, dict | None]:
    """(the copy bandwidth measured in this process, the device's spec figures or None)."""
    spec = spec_for(torch.cuda.get_device_name(dev)) if dev.type == "cuda" else None
    return copy_bandwidth_gbps(str(dev)), spec


def decode_cases(dev, dtype, heads, batch, ctx, quick, compiled) -> list[Case]:
    _, num_q_heads, num_kv_heads, head_dim = heads
    copy_bw, spec = _device_figures(dev)
    k_cache, v_cache, block_tables, k_dense, v_dense = paged_layout(
        [ctx] * batch, num_kv_heads, head_dim, PAGE_SIZE, dtype, dev)
    context_lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    q = torch.randn(batch, num_q_heads, head_dim, dtype=dtype, device=dev)
    args = (q, k_cache, v_cache, block_tables, context_lens)
    calls = _providers("paged_decode_attention", paged_decode_attention, paged_decode_attention_ref,
                       compiled, sdpa_fn(q[:, :, None], k_dense, v_dense), args, dev)
    elem = q.element_size()
    nbytes = 2 * batch * ctx * num_kv_heads * head_dim * elem + 2 * q.numel() * elem

    def finish(rec: Record) -> None:
        if rec.gbps:
            rec.extra["pct_of_copy_bw"] = round(100 * rec.gbps / copy_bw, 1)
            if spec:
                rec.extra["pct_of_spec_bw"] = round(100 * rec.gbps / spec["hbm_gbps"], 1)

    return [Case("paged_decode_attention", provider, _decode_label(heads, batch, ctx), dtype, fn, nbytes=nbytes,
                 baseline=BASELINE, extra=dict(copy_bw_gbps=round(copy_bw, 1)), finish=finish,
                 rep=20 if quick else 100)
            for provider, fn in calls.items()]


def prefill_cases(dev, dtype, heads, new, cached, quick, compiled) -> list[Case]:
    _, num_q_heads, num_kv_heads, head_dim = heads
    copy_bw, spec = _device_figures(dev)
    ctx = new + cached
    k_cache, v_cache, block_tables, k_dense, v_dense = paged_layout(
        [ctx], num_kv_heads, head_dim, PAGE_SIZE, dtype, dev, seed=1)
    q = torch.randn(new, num_q_heads, head_dim, dtype=dtype, device=dev)
    cu = torch.tensor([0, new], dtype=torch.int32, device=dev)
    context_lens = torch.tensor([ctx], dtype=torch.int32, device=dev)
    args = (q, k_cache, v_cache, block_tables, cu, context_lens)
    q_dense = q.transpose(0, 1)[None]  # (1, Hq, new, D)
    if cached == 0:
        peer = sdpa_fn(q_dense, k_dense, v_dense, is_causal=True)
    else:
        from torch.nn.attention.bias import causal_lower_right

        # New token j sees keys 0 .. cached + j (bottom-right causal, never a dense mask).
        peer = sdpa_fn(q_dense, k_dense, v_dense, attn_mask=causal_lower_right(new, ctx))
    calls = _providers("paged_prefill_attention", paged_prefill_attention, paged_prefill_attention_ref,
                       compiled, peer, args, dev)
    pairs = new * cached + new * (new + 1) // 2
    flops = 4 * num_q_heads * head_dim * pairs

    def finish(rec: Record) -> None:
        if rec.tflops and spec:
            rec.extra["pct_of_spec_tflops"] = round(100 * rec.tflops / spec["bf16_tflops"], 1)

    return [Case("paged_prefill_attention", provider, _prefill_label(heads, new, cached), dtype, fn, flops=flops,
                 baseline=BASELINE, extra=dict(copy_bw_gbps=round(copy_bw, 1)), finish=finish,
                 rep=10 if quick else 50)
            for provider, fn in calls.items()]


def case_groups(device: str = "cuda", quick: bool = False, preset: str = "qwen2.5-omni-7b") -> list[CaseGroup]:
    """One group per decode (batch, context), then one per prefill (new, cached); each builds its paged cache. The
    copy bandwidth is measured with the first group built (once per process)."""
    dev = torch.device(device)
    on_gpu = dev.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    heads = THINKER_HEADS[preset]
    small = quick or not on_gpu
    decode_compiled = torch.compile(paged_decode_attention_ref, dynamic=True) if on_gpu else None
    prefill_compiled = torch.compile(paged_prefill_attention_ref, dynamic=True) if on_gpu else None
    groups = []
    for batch in DECODE_BATCHES_QUICK if small else DECODE_BATCHES:
        for ctx in DECODE_CONTEXTS_QUICK if small else DECODE_CONTEXTS:
            groups.append(CaseGroup(
                keys("paged_decode_attention", providers("paged_decode_attention", dev),
                     _decode_label(heads, batch, ctx), dtype),
                partial(decode_cases, dev, dtype, heads, batch, ctx, quick, decode_compiled)))
    for new, cached in PREFILL_QUICK if small else PREFILL:
        groups.append(CaseGroup(
            keys("paged_prefill_attention", providers("paged_prefill_attention", dev),
                 _prefill_label(heads, new, cached), dtype),
            partial(prefill_cases, dev, dtype, heads, new, cached, quick, prefill_compiled)))
    return groups


def run(device: str = "cuda", quick: bool = False, preset: str = "qwen2.5-omni-7b") -> list[Record]:
    return run_groups(case_groups(device, quick, preset), device)


if __name__ == "__main__":
    bench_main(run, __doc__)
