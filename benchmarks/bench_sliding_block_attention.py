"""sliding_block_attention: the Token2Wav DiT's block-banded attention (TFLOP/s over the visible pairs only).

Shapes: the DiT at 16 heads x 64, blocks of 24 frames, the guidance pair (2 sequences) of 300 and 3000 mel frames
(3 s and 30 s of audio), the block-diagonal window of 19 of its 22 layers and the one-block look-back of layers
0 and 20 (look-ahead costs the same).

Providers: torch (the blockwise reference), torch.compile of it, hf-sdpa-dense (HF 4.57.6: a dense (B, H, T, T)
boolean mask from ``block_diff`` and SDPA, with its layout changes; the baseline), flex (FlexAttention with the
equivalent BlockMask, compiled; CUDA only), triton, cuda. Skipped masked tiles are not counted as work.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from omni_kernels import available, sliding_block_attention, sliding_block_attention_ref
from omni_kernels.testing import Record, do_bench, make_record, set_speedups

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


def _providers(dev, q, k, v, cu, frames, back, ahead, compiled) -> dict:
    kw = dict(block_size=BLOCK_SIZE, look_back=back, look_ahead=ahead)
    batched = [t.view(GUIDANCE_BATCH, frames, HEADS, HEAD_DIM).transpose(1, 2) for t in (q, k, v)]  # HF layout
    blocks = torch.arange(frames, device=dev) // BLOCK_SIZE
    block_diff = (blocks[None, :] - blocks[:, None]).expand(GUIDANCE_BATCH, HEADS, frames, frames)  # once a forward

    def hf_dense():
        mask = (block_diff >= -back) & (block_diff <= ahead)  # per layer, (B, H, T, T)
        out = F.scaled_dot_product_attention(*batched, attn_mask=mask)
        return out.transpose(1, 2).contiguous()

    providers = {
        "torch": lambda: sliding_block_attention_ref(q, k, v, cu_seqlens=cu, **kw),
        "torch.compile": lambda: compiled(q, k, v, cu_seqlens=cu, **kw),
        BASELINE: hf_dense,
    }
    if dev.type == "cuda":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def rule(b, h, q_idx, kv_idx):
            diff = kv_idx // BLOCK_SIZE - q_idx // BLOCK_SIZE
            return (diff >= -back) & (diff <= ahead)

        block_mask = create_block_mask(rule, B=None, H=None, Q_LEN=frames, KV_LEN=frames, device=dev)
        flex = torch.compile(flex_attention)
        providers["flex"] = lambda: flex(*batched, block_mask=block_mask)
    for backend in available("sliding_block_attention", dev):
        if backend == "torch" or (backend == "triton" and dev.type == "cpu"):
            continue
        providers[backend] = lambda b=backend: sliding_block_attention(q, k, v, cu_seqlens=cu, backend=b, **kw)
    return providers


def run(device: str = "cuda", quick: bool = False, preset: str = "qwen2.5-omni-7b") -> list[Record]:
    # The DiT is the same in the 7B and 3B checkpoints: the preset does not change the shapes.
    dev = torch.device(device)
    dtypes = (torch.float32, torch.bfloat16) if dev.type == "cuda" else (torch.float32,)
    compiled = torch.compile(sliding_block_attention_ref)
    records = []
    for frames in FRAMES_QUICK if quick else FRAMES:
        cu = torch.tensor([0, frames, 2 * frames], dtype=torch.int32, device=dev)
        for dtype in dtypes:
            qkv = torch.randn(GUIDANCE_BATCH * frames, 3, HEADS, HEAD_DIM, device=dev, dtype=dtype)
            q, k, v = qkv.unbind(1)  # views into a fused QKV output, as in the DiT
            for back, ahead in WINDOWS[:1] if quick else WINDOWS:
                pairs = GUIDANCE_BATCH * visible_pairs(frames, BLOCK_SIZE, back, ahead)
                flops = 4 * HEAD_DIM * HEADS * pairs
                label = (f"dit B={GUIDANCE_BATCH} T={frames} H={HEADS} D={HEAD_DIM} block={BLOCK_SIZE} "
                         f"back={back} ahead={ahead}")
                for name, fn in _providers(dev, q, k, v, cu, frames, back, ahead, compiled).items():
                    try:
                        timing, error = do_bench(fn, device=dev, rep=10 if quick else 100), None
                    except Exception as e:  # a peer that cannot run this shape: recorded, not hidden
                        timing, error = None, f"{type(e).__name__}: {e}"[:300]
                    extra = {"error": error} if error else {}
                    records.append(make_record(bench="sliding_block_attention", provider=name, shape=label,
                                               dtype=dtype, device=dev, timing=timing, flops=flops, **extra))
    return set_speedups(records, BASELINE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(json.dumps([r.to_dict() for r in run(args.device, args.quick)], indent=1))


if __name__ == "__main__":
    main()
