"""sliding_block_attention: the Token2Wav DiT's block-banded attention (TFLOP/s over the visible pairs only).

Shapes: the DiT at 16 heads x 64, blocks of 24 frames, the guidance pair (2 sequences) of 300 and 3000 mel frames
(3 s and 30 s of audio), the block-diagonal window of 19 of its 22 layers and the one-block look-back of layers
0 and 20 (look-ahead costs the same).

Providers: torch (the blockwise reference), torch.compile of it, hf-sdpa-dense (HF 4.57.6: a dense (B, H, T, T)
boolean mask from ``block_diff`` and SDPA, with its layout changes; the baseline), flex (FlexAttention with the
equivalent BlockMask, compiled; CUDA only), triton, cuda. Skipped masked tiles are not counted as work.

Flex is compiled once per process (a module-level wrapper, ``dynamic=False``): each (T, dtype, back, ahead) case is
one static specialisation with ``back``/``ahead`` baked in as constants. A fresh ``torch.compile(flex_attention)``
per case with the default automatic-dynamic policy gave a timing for the first case only (H100, torch 2.11): the
second case changes the mask rule's closed-over ``back``, dynamo recompiles with that int as a SymInt, and
Inductor's flex lowering cannot take a symbolic int captured by the mask; the frame stays dynamic, so every later
case fails the same way (the same pattern reproduced on CPU, torch 2.13: ``LoweringException: AttributeError:
'Mul' object has no attribute 'get_name'``; see pytorch/pytorch#136914).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from omni_benchmarks.cases import Case, CaseGroup, compiled_backends, keys, run_groups
from omni_kernels import sliding_block_attention, sliding_block_attention_ref
from omni_kernels.testing import Record, bench_main

BENCH = "sliding_block_attention"
HEADS, HEAD_DIM, BLOCK_SIZE, GUIDANCE_BATCH = 16, 64, 24, 2
FRAMES = (300, 3000)
FRAMES_QUICK = (300,)
WINDOWS = ((0, 0), (1, 0))
BASELINE = "hf-sdpa-dense"


def visible_pairs(length: int, block_size: int, back: int, ahead: int) -> int:
    """(query, key) pairs the rule lets through in one sequence."""
    num_blocks = -(-length // block_size)
    pairs = 0
    for b in range(num_blocks):
        rows = min(block_size, length - b * block_size)
        keys = min((b + ahead + 1) * block_size, length) - max(b - back, 0) * block_size
        pairs += rows * keys
    return pairs


def block_band_rule(back: int, ahead: int):
    """FlexAttention mask_mod of the DiT's rule: key block - query block in [-back, ahead] (HF ``block_diff``)."""

    def rule(b, h, q_idx, kv_idx):
        diff = kv_idx // BLOCK_SIZE - q_idx // BLOCK_SIZE
        return (diff >= -back) & (diff <= ahead)

    return rule


def _flex_banded(q, k, v, block_mask):
    # A wrapper of our own, so the dynamo cache entries (and the recompile limit they count against) are this
    # bench's, not shared with every other torch.compile(flex_attention) in the process (bench_window_attention).
    return flex_attention(q, k, v, block_mask=block_mask)


@functools.cache
def _compiled_flex():
    # dynamic=False: the mask's back/ahead stay Python constants (a SymInt closed over by the mask is what broke
    # every case after the first) and each sequence length gets the static kernel a real DiT call would use.
    return torch.compile(_flex_banded, dynamic=False)


# Specialisations one full run needs: 2 lengths x 2 dtypes x 2 windows = 8, exactly dynamo's default
# recompile_limit; past it dynamo would silently run flex_attention eagerly (the unfused math path) and the bench
# would time that. So the compiling call raises the limit for this frame and turns a hit into an error.
FLEX_RECOMPILE_LIMIT = 64


def flex_provider(batched: list[torch.Tensor], frames: int, back: int, ahead: int) -> Callable[[], torch.Tensor]:
    """A zero-argument callable running compiled FlexAttention on ``batched`` (q, k, v: (B, H, T, D)) with the
    BlockMask of the (back, ahead) rule. The first call builds the mask and compiles (do_bench's untimed first
    call, so a failure lands in the record's ``error``); later calls only run the kernel."""
    flex, state = _compiled_flex(), {}

    def call():
        if not state:
            state["mask"] = create_block_mask(block_band_rule(back, ahead), B=None, H=None, Q_LEN=frames,
                                              KV_LEN=frames, device=batched[0].device)
            limit = max(torch._dynamo.config.recompile_limit, FLEX_RECOMPILE_LIMIT)
            with torch._dynamo.config.patch(recompile_limit=limit, fail_on_recompile_limit_hit=True):
                return flex(*batched, block_mask=state["mask"])
        return flex(*batched, block_mask=state["mask"])

    return call


def providers(dev: torch.device) -> list[str]:
    return ["torch", "torch.compile", BASELINE, *(["flex"] if dev.type == "cuda" else []),
            *compiled_backends(BENCH, dev)]


def _providers(dev, q, k, v, cu, frames, back, ahead, compiled) -> dict:
    kw = dict(block_size=BLOCK_SIZE, look_back=back, look_ahead=ahead)
    batched = [t.view(GUIDANCE_BATCH, frames, HEADS, HEAD_DIM).transpose(1, 2) for t in (q, k, v)]  # HF layout
    blocks = torch.arange(frames, device=dev) // BLOCK_SIZE
    block_diff = (blocks[None, :] - blocks[:, None]).expand(GUIDANCE_BATCH, HEADS, frames, frames)  # once a forward

    def hf_dense():
        mask = (block_diff >= -back) & (block_diff <= ahead)  # per layer, (B, H, T, T)
        out = F.scaled_dot_product_attention(*batched, attn_mask=mask)
        return out.transpose(1, 2).contiguous()

    calls = {
        "torch": lambda: sliding_block_attention_ref(q, k, v, cu_seqlens=cu, **kw),
        "torch.compile": lambda: compiled(q, k, v, cu_seqlens=cu, **kw),
        BASELINE: hf_dense,
    }
    if dev.type == "cuda":
        calls["flex"] = flex_provider(batched, frames, back, ahead)
    for backend in compiled_backends(BENCH, dev):
        calls[backend] = lambda b=backend: sliding_block_attention(q, k, v, cu_seqlens=cu, backend=b, **kw)
    return calls


def case_groups(device: str = "cuda", quick: bool = False, preset: str = "qwen2.5-omni-7b") -> list[CaseGroup]:
    """One group per (frames, dtype, window). The DiT is the same in the 7B and 3B checkpoints: the preset does not
    change the shapes."""
    dev = torch.device(device)
    dtypes = (torch.float32, torch.bfloat16) if dev.type == "cuda" else (torch.float32,)
    compiled = torch.compile(sliding_block_attention_ref)

    def build(frames, dtype, back, ahead, label) -> list[Case]:
        cu = torch.tensor([0, frames, 2 * frames], dtype=torch.int32, device=dev)
        qkv = torch.randn(GUIDANCE_BATCH * frames, 3, HEADS, HEAD_DIM, device=dev, dtype=dtype)
        q, k, v = qkv.unbind(1)  # views into a fused QKV output, as in the DiT
        flops = 4 * HEAD_DIM * HEADS * GUIDANCE_BATCH * visible_pairs(frames, BLOCK_SIZE, back, ahead)
        # catch: a peer that cannot run this shape is recorded, not hidden.
        return [Case(BENCH, name, label, dtype, fn, flops=flops, baseline=BASELINE, rep=10 if quick else 100,
                     catch=True, error_chars=300)
                for name, fn in _providers(dev, q, k, v, cu, frames, back, ahead, compiled).items()]

    groups = []
    for frames in FRAMES_QUICK if quick else FRAMES:
        for dtype in dtypes:
            for back, ahead in WINDOWS[:1] if quick else WINDOWS:
                label = (f"dit B={GUIDANCE_BATCH} T={frames} H={HEADS} D={HEAD_DIM} block={BLOCK_SIZE} "
                         f"back={back} ahead={ahead}")
                groups.append(CaseGroup(keys(BENCH, providers(dev), label, dtype),
                                        partial(build, frames, dtype, back, ahead, label)))
    return groups


def run(device: str = "cuda", quick: bool = False, preset: str = "qwen2.5-omni-7b") -> list[Record]:
    return run_groups(case_groups(device, quick, preset), device)


if __name__ == "__main__":
    bench_main(run, __doc__)
