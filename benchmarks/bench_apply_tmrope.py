"""apply_tmrope and tmrope_store_kv: TMRoPE over long prefills and the fused decode step (GB/s).

bench "apply_tmrope": 8k, 16k, 32k, 64k tokens at the Thinker shape (7B: Hq 28, Hk 4, D 128; bf16), q and k as
views into a fused QKV output (T, (Hq + 2 Hk) D). Bytes: q and k read and written once, plus the positions.
Providers:
* hf: HF transformers 4.57.6's ``Qwen2_5OmniRotaryEmbedding`` (cos/sin (3, 1, T, D) in fp32, then cast) followed
  by ``apply_multimodal_rotary_pos_emb`` (out of place, as HF runs it); imported from transformers when installed,
  else an equivalent written here (the record's ``hf_source`` says which). The baseline.
* hf-apply: the same with cos/sin built outside the timing (HF builds them once per forward, for all layers).
* torch (the reference, in place), torch.compile (of the reference), triton, cuda.

bench "tmrope_store_kv": the decode step, batch 1..64 tokens, rotate q and k and write k, v to a paged cache
(page 16). Bytes: q read and written, k and v read, their cache rows written, positions and slots read (the
in-place copy of the rotated k is not counted: the step does not need it). Providers: hf (HF's cos/sin and apply,
then the reference scatter into the cache: HF has no paged cache), torch (the reference), torch.compile, unfused
(apply_tmrope then store_kv_cache, each on its default backend; CUDA only), triton, cuda.
"""

from __future__ import annotations

import functools
from functools import partial

import torch

from omni_benchmarks.cases import Case, CaseGroup, compiled_backends, keys, run_groups
from omni_kernels import (
    apply_tmrope,
    apply_tmrope_ref,
    store_kv_cache,
    store_kv_cache_ref,
    tmrope_store_kv,
    tmrope_store_kv_ref,
)
from omni_kernels.apply_tmrope import rope_inv_freq
from omni_kernels.testing import Record, bench_main

# (num_q_heads, num_kv_heads, head_dim, mrope_section, rope_theta) of the Thinker (docs/model.md).
THINKER = {"qwen2.5-omni-7b": (28, 4, 128, (16, 24, 24), 1e6), "qwen2.5-omni-3b": (16, 2, 128, (16, 24, 24), 1e6)}
PREFILL_TOKENS = (8192, 16384, 32768, 65536)
PREFILL_TOKENS_QUICK = (256,)
DECODE_TOKENS = (1, 4, 16, 64)
DECODE_TOKENS_QUICK = (4,)
PAGE_SIZE = 16


def _hf_functions(num_q_heads, num_kv_heads, head_dim, sections, theta, device):
    """(rotary(x, position_ids) -> (cos, sin), apply(q, k, cos, sin, sections, unsqueeze_dim), source)."""
    try:
        from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniTextConfig
        from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (
            Qwen2_5OmniRotaryEmbedding,
            apply_multimodal_rotary_pos_emb,
        )
    except ImportError:
        return (*_hf_equivalent(head_dim, theta, device), "bench copy of HF 4.57.6")
    import transformers

    config = Qwen2_5OmniTextConfig(
        hidden_size=num_q_heads * head_dim, num_attention_heads=num_q_heads, num_key_value_heads=num_kv_heads,
        rope_theta=theta, rope_scaling={"mrope_section": list(sections), "rope_type": "default", "type": "default"},
    )
    rotary = Qwen2_5OmniRotaryEmbedding(config=config).to(device)
    return rotary, apply_multimodal_rotary_pos_emb, f"transformers {transformers.__version__}"


def _hf_equivalent(head_dim, theta, device):
    # The same operations as HF 4.57.6, for machines without transformers.
    inv_freq = rope_inv_freq(head_dim, theta, device)

    def rotary(x, position_ids):
        freqs = (inv_freq[None, None, :, None].expand(3, position_ids.shape[1], -1, 1)
                 @ position_ids[:, :, None, :].float()).transpose(2, 3)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    def rotate_half(x):
        return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)

    def apply(q, k, cos, sin, mrope_section, unsqueeze_dim=1):
        split = list(mrope_section) * 2
        cos = torch.cat([m[i % 3] for i, m in enumerate(cos.split(split, dim=-1))], dim=-1).unsqueeze(unsqueeze_dim)
        sin = torch.cat([m[i % 3] for i, m in enumerate(sin.split(split, dim=-1))], dim=-1).unsqueeze(unsqueeze_dim)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin

    return rotary, apply


def _inputs(num_tokens, num_q_heads, num_kv_heads, head_dim, dtype, dev):
    qkv = torch.randn(num_tokens, (num_q_heads + 2 * num_kv_heads) * head_dim, device=dev, dtype=dtype)
    q = qkv[:, : num_q_heads * head_dim].view(num_tokens, num_q_heads, head_dim)
    k = qkv[:, num_q_heads * head_dim: (num_q_heads + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads,
                                                                                     head_dim)
    v = qkv[:, (num_q_heads + num_kv_heads) * head_dim:].view(num_tokens, num_kv_heads, head_dim)
    # Non-monotonic, different axes (a video with its audio), up to 32k+.
    positions = torch.randint(0, max(40000, num_tokens), (3, num_tokens), device=dev)
    return qkv, q, k, v, positions


def prefill_providers(dev: torch.device) -> list[str]:
    return ["hf", "hf-apply", "torch", "torch.compile", *compiled_backends("apply_tmrope", dev)]


def decode_providers(dev: torch.device) -> list[str]:
    return ["hf", "torch", "torch.compile", *(["unfused"] if dev.type == "cuda" else []),
            *compiled_backends("tmrope_store_kv", dev)]


def _prefill_label(shape, num_tokens: int) -> str:
    num_q_heads, num_kv_heads, head_dim, sections, _ = shape
    return f"T={num_tokens} Hq={num_q_heads} Hk={num_kv_heads} D={head_dim} mrope={list(sections)} fused-qkv"


def _decode_label(shape, num_tokens: int) -> str:
    num_q_heads, num_kv_heads, head_dim, _, _ = shape
    return f"T={num_tokens} Hq={num_q_heads} Hk={num_kv_heads} D={head_dim} P={PAGE_SIZE} fused-qkv"


def _prefill_cases(dev, dtype, shape, num_tokens, rep, hf_rotary, compiled) -> list[Case]:
    num_q_heads, num_kv_heads, head_dim, sections, theta = shape
    rotary, hf_apply, hf_source = hf_rotary
    qkv, q, k, _, positions = _inputs(num_tokens, num_q_heads, num_kv_heads, head_dim, dtype, dev)
    position_ids = positions[:, None, :]  # HF's (3, B, L)
    cached = rotary(qkv, position_ids)
    kw = dict(mrope_section=list(sections), rope_theta=theta)
    calls = {
        "hf": lambda: hf_apply(q[None], k[None], *rotary(qkv, position_ids), list(sections), unsqueeze_dim=2),
        "hf-apply": lambda: hf_apply(q[None], k[None], *cached, list(sections), unsqueeze_dim=2),
        "torch": lambda: apply_tmrope_ref(q, k, positions, **kw),
        "torch.compile": lambda: compiled(q, k, positions, **kw),
    }
    for b in compiled_backends("apply_tmrope", dev):
        calls[b] = lambda b=b: apply_tmrope(q, k, positions, backend=b, **kw)
    nbytes = 2 * (q.numel() + k.numel()) * q.element_size() + positions.numel() * positions.element_size()
    label = _prefill_label(shape, num_tokens)
    return [Case("apply_tmrope", name, label, dtype, fn, nbytes=nbytes, baseline="hf", rep=rep,
                 extra=dict(hf_source=hf_source))
            for name, fn in calls.items()]


def _decode_cases(dev, dtype, shape, num_tokens, rep, hf_rotary, compiled) -> list[Case]:
    num_q_heads, num_kv_heads, head_dim, sections, theta = shape
    rotary, hf_apply, hf_source = hf_rotary
    num_blocks = 256
    qkv, q, k, v, positions = _inputs(num_tokens, num_q_heads, num_kv_heads, head_dim, dtype, dev)
    k_cache = torch.zeros(num_blocks, PAGE_SIZE, num_kv_heads, head_dim, device=dev, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.randperm(num_blocks * PAGE_SIZE, device=dev)[:num_tokens]
    position_ids = positions[:, None, :]
    kw = dict(mrope_section=list(sections), rope_theta=theta)

    def hf():
        q_embed, k_embed = hf_apply(q[None], k[None], *rotary(qkv, position_ids), list(sections), unsqueeze_dim=2)
        store_kv_cache_ref(k_embed[0], v, k_cache, v_cache, slots)
        return q_embed

    def unfused():
        apply_tmrope(q, k, positions, **kw)
        store_kv_cache(k, v, k_cache, v_cache, slots)

    args = (q, k, v, positions, k_cache, v_cache, slots)
    calls = {
        "hf": hf,
        "torch": lambda: tmrope_store_kv_ref(*args, **kw),
        "torch.compile": lambda: compiled(*args, **kw),
    }
    if dev.type == "cuda":
        calls["unfused"] = unfused
    for b in compiled_backends("tmrope_store_kv", dev):
        calls[b] = lambda b=b: tmrope_store_kv(*args, backend=b, **kw)
    nbytes = ((2 * q.numel() + 4 * k.numel()) * q.element_size() + positions.numel() * positions.element_size()
              + slots.numel() * slots.element_size())
    label = _decode_label(shape, num_tokens)
    return [Case("tmrope_store_kv", name, label, dtype, fn, nbytes=nbytes, baseline="hf", rep=rep,
                 extra=dict(hf_source=hf_source))
            for name, fn in calls.items()]


def case_groups(device: str = "cuda", quick: bool = False, preset: str = "qwen2.5-omni-7b") -> list[CaseGroup]:
    """One group per prefill length (bench apply_tmrope), then one per decode batch (tmrope_store_kv); HF's rotary
    module is built once, with the first group."""
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    shape = THINKER[preset]
    rep = 20 if quick else 100
    hf_rotary = functools.cache(lambda: _hf_functions(*shape, dev))
    prefill_compiled = torch.compile(apply_tmrope_ref)
    decode_compiled = torch.compile(tmrope_store_kv_ref)

    def prefill(num_tokens):
        return _prefill_cases(dev, dtype, shape, num_tokens, rep, hf_rotary(), prefill_compiled)

    def decode(num_tokens):
        return _decode_cases(dev, dtype, shape, num_tokens, rep, hf_rotary(), decode_compiled)

    return ([CaseGroup(keys("apply_tmrope", prefill_providers(dev), _prefill_label(shape, n), dtype),
                       partial(prefill, n)) for n in (PREFILL_TOKENS_QUICK if quick else PREFILL_TOKENS)]
            + [CaseGroup(keys("tmrope_store_kv", decode_providers(dev), _decode_label(shape, n), dtype),
                         partial(decode, n)) for n in (DECODE_TOKENS_QUICK if quick else DECODE_TOKENS)])


def run(device: str = "cuda", quick: bool = False, preset: str = "qwen2.5-omni-7b") -> list[Record]:
    return run_groups(case_groups(device, quick, preset), device)


if __name__ == "__main__":
    bench_main(run, __doc__)
