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

import functools
from functools import partial

import torch

from omni_benchmarks.cases import Case, CaseGroup, compiled_backends, keys, run_groups
from omni_kernels import anti_aliased_snake, anti_aliased_snake_ref
from omni_kernels.anti_aliased_snake import kaiser_sinc_filter
from omni_kernels.testing import Record, bench_main

BENCH = "anti_aliased_snake"
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


@functools.cache
def _hf_classes():
    """HF's (SnakeBeta, TorchActivation1d), or None without transformers."""
    try:
        from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import SnakeBeta, TorchActivation1d
    except ImportError:
        return None
    return SnakeBeta, TorchActivation1d


def _hf_module(channels, alpha, beta, dtype, dev):
    SnakeBeta, TorchActivation1d = _hf_classes()
    act = TorchActivation1d(activation=SnakeBeta(channels)).to(device=dev, dtype=dtype)
    with torch.no_grad():
        act.act.alpha.copy_(alpha)
        act.act.beta.copy_(beta)
    return act.requires_grad_(False)  # inference: no autograd graph


def providers(dev: torch.device) -> list[str]:
    """torch, torch.compile, HF's module (when transformers is installed), then our compiled backends."""
    return ["torch", "torch.compile", *([BASELINE] if _hf_classes() is not None else []),
            *compiled_backends(BENCH, dev)]


def _providers(dev, x, alpha, beta, up, down, compiled) -> dict:
    calls = {
        "torch": lambda: anti_aliased_snake_ref(x, alpha, beta, up, down),
        "torch.compile": lambda: compiled(x, alpha, beta, up, down),
    }
    if _hf_classes() is not None:
        hf = _hf_module(x.shape[1], alpha, beta, x.dtype, dev)
        calls[BASELINE] = lambda: hf(x)
    for backend in compiled_backends(BENCH, dev):
        calls[backend] = lambda b=backend: anti_aliased_snake(x, alpha, beta, up, down, backend=b)
    return calls


def case_groups(device: str = "cuda", quick: bool = False, preset: str = "qwen2.5-omni-7b") -> list[CaseGroup]:
    """One group per (BigVGAN stage, dtype). BigVGAN is the same in the 7B and 3B checkpoints: the preset does not
    change the shapes."""
    dev = torch.device(device)
    dtypes = (torch.float32, torch.bfloat16) if dev.type == "cuda" else (torch.float32,)
    shapes = stage_shapes(MEL_FRAMES_QUICK)[-2:] if quick else stage_shapes(MEL_FRAMES)
    compiled = torch.compile(anti_aliased_snake_ref)
    baseline = BASELINE if _hf_classes() is not None else "torch"

    def build(batch, channels, length, dtype, label) -> list[Case]:
        up = down = kaiser_sinc_filter().to(dev)
        gen = torch.Generator().manual_seed(channels)
        alpha = (0.3 * torch.randn(channels, generator=gen)).to(dev)
        beta = (0.3 * torch.randn(channels, generator=gen)).to(dev)
        x = torch.randn(batch, channels, length, device=dev, dtype=dtype)
        nbytes = 2 * x.numel() * x.element_size()
        return [Case(BENCH, name, label, dtype, fn, nbytes=nbytes, baseline=baseline, rep=10 if quick else 100)
                for name, fn in _providers(dev, x, alpha, beta, up, down, compiled).items()]

    groups = []
    for batch, channels, length in shapes:
        label = f"bigvgan B={batch} C={channels} T={length}"
        for dtype in dtypes:
            groups.append(CaseGroup(keys(BENCH, providers(dev), label, dtype),
                                    partial(build, batch, channels, length, dtype, label)))
    return groups


def run(device: str = "cuda", quick: bool = False, preset: str = "qwen2.5-omni-7b") -> list[Record]:
    return run_groups(case_groups(device, quick, preset), device)


if __name__ == "__main__":
    bench_main(run, __doc__)
