"""anti_aliased_snake: BigVGAN's anti-aliased SnakeBeta (GB/s counting x read once and y written once).

Shapes: the activations of each BigVGAN upsampling stage for a 10 s clip (1000 mel frames; docs/model.md: conv_pre to
1536 channels, upsample rates 5, 3, 2, 2, 2, 2 with the width halving at each): (1, 768, 5000), (1, 384, 15000),
(1, 192, 30000), (1, 96, 60000), (1, 48, 120000), (1, 24, 240000); each runs 18 times per clip (6 in each of the 3
AMP blocks of its stage), the last one once more before conv_post.

Providers: torch (the reference: HF's conv_transpose1d / SnakeBeta / conv1d math in fp32), torch.compile of it,
hf-torch (HF 4.57.6's own ``TorchActivation1d(SnakeBeta)`` module in the input dtype; the baseline; needs
transformers), triton, cuda.
"""

from __future__ import annotations

import torch

from omni_kernels import anti_aliased_snake, anti_aliased_snake_ref, available
from omni_kernels.anti_aliased_snake import kaiser_sinc_filter
from omni_kernels.testing import Record, bench_main, do_bench, make_record, set_speedups

INITIAL_CHANNELS = 1536
UPSAMPLE_RATES = (5, 3, 2, 2, 2, 2)
MEL_FRAMES = 1000  # 10 s at 100 mel frames per second (240 samples of 24 kHz each)
MEL_FRAMES_QUICK = 10
BASELINE = "hf-torch"


def stage_shapes(mel_frames: int) -> list[tuple[int, int, int]]:
    """(B, C, T) of the activations after each upsampling layer."""
    shapes, length = [], mel_frames
    for i, rate in enumerate(UPSAMPLE_RATES):
        length *= rate
        shapes.append((1, INITIAL_CHANNELS // 2 ** (i + 1), length))
    return shapes


def _hf_module(channels, alpha, beta, dtype, dev):
    try:
        from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import SnakeBeta, TorchActivation1d
    except ImportError:
        return None
    act = TorchActivation1d(activation=SnakeBeta(channels)).to(device=dev, dtype=dtype)
    with torch.no_grad():
        act.act.alpha.copy_(alpha)
        act.act.beta.copy_(beta)
    return act.requires_grad_(False)  # inference: no autograd graph


def _providers(dev, x, alpha, beta, up, down, compiled) -> dict:
    providers = {
        "torch": lambda: anti_aliased_snake_ref(x, alpha, beta, up, down),
        "torch.compile": lambda: compiled(x, alpha, beta, up, down),
    }
    hf = _hf_module(x.shape[1], alpha, beta, x.dtype, dev)
    if hf is not None:
        providers[BASELINE] = lambda: hf(x)
    for backend in available("anti_aliased_snake", dev):
        if backend == "torch" or (backend == "triton" and dev.type == "cpu"):
            continue
        providers[backend] = lambda b=backend: anti_aliased_snake(x, alpha, beta, up, down, backend=b)
    return providers


def run(device: str = "cuda", quick: bool = False, preset: str = "qwen2.5-omni-7b") -> list[Record]:
    # BigVGAN is the same in the 7B and 3B checkpoints: the preset does not change the shapes.
    dev = torch.device(device)
    dtypes = (torch.float32, torch.bfloat16) if dev.type == "cuda" else (torch.float32,)
    shapes = stage_shapes(MEL_FRAMES_QUICK)[-2:] if quick else stage_shapes(MEL_FRAMES)
    compiled = torch.compile(anti_aliased_snake_ref)
    up = down = kaiser_sinc_filter().to(dev)
    records = []
    for batch, channels, length in shapes:
        alpha = 0.3 * torch.randn(channels, device=dev)
        beta = 0.3 * torch.randn(channels, device=dev)
        for dtype in dtypes:
            x = torch.randn(batch, channels, length, device=dev, dtype=dtype)
            nbytes = 2 * x.numel() * x.element_size()
            label = f"bigvgan B={batch} C={channels} T={length}"
            for name, fn in _providers(dev, x, alpha, beta, up, down, compiled).items():
                timing = do_bench(fn, device=dev, rep=10 if quick else 100)
                records.append(make_record(bench="anti_aliased_snake", provider=name, shape=label, dtype=dtype,
                                           device=dev, timing=timing, nbytes=nbytes))
    baseline = BASELINE if any(r.provider == BASELINE for r in records) else "torch"
    return set_speedups(records, baseline)


if __name__ == "__main__":
    bench_main(run, __doc__)
