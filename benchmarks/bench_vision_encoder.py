"""Vision encoder: the whole ViT (patch embed, 32 blocks, merger) against HF's ``Qwen2_5OmniVisionEncoder``.

Inputs (the grids of bench_window_attention, through its ``vision_grid``): a 1280x720 picture (1288x728 after the
processor's resize: a 1 x 52 x 92 patch grid, 4784 patches -> 1196 merged tokens) and a 2 s video chunk, 4 frames
of 448x252 at 2 fps (2 x 18 x 32 patches, 1152 -> 288 tokens). Pixels are the processor's flattened patches
(N, C * tp * p * p) in fp32, cast by each encoder (HF casts them too). On CPU (``quick``): the tiny preset's
vision config and tiny inputs (a 224x168 picture, 4 frames of 112x84), fp32.

Providers (same random weights, same pixels; bf16 on CUDA):

* ``hf``: transformers 4.57.6 ``Qwen2_5OmniVisionEncoder`` with ``attn_implementation="sdpa"`` (per layer: the
  segment lengths read back to the host, one SDPA call per window or temporal slice, a cat), ``grid_thw`` on the
  device as the processor's output is after ``.to(device)``; the baseline of ``speedup``;
* ``omni``: ours (:class:`omni_model.models.vision_encoder.VisionEncoder`) with the default backends (on CUDA the
  preferred compiled ``window_attention``; on CPU the torch reference);
* ``omni-torch``: ours forced to the torch backend (``use_backend("torch")``): the difference to ``omni`` is the
  kernels' share.

Work: the matmul FLOPs of one forward (patch embed, q/k/v/proj, the gated MLP, the merger's two linears, and
4 * sum(len_i ** 2) * hidden for QK^T and PV inside the attention segments of each block); norms, rotary and
activations are not counted. Extra fields: ``max_rel_err_vs_hf`` (``omni*`` rows: max |ours - HF| / max |HF|
over the merged tokens, checked once per input before timing, same dtype on both sides), ``attention_backend``
(the ``window_attention`` backend the row ran), ``hf_attn_implementation`` (``hf`` rows), ``peak_mib`` (CUDA),
``error`` (a provider that failed: recorded, not raised).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from functools import partial

import torch

from omni_benchmarks.bench_thinker import (
    build_random,
    copy_into_hf,
    hf_build_context,
    preset_for,
    short_name,
)
from omni_benchmarks.bench_window_attention import vision_grid
from omni_benchmarks.cases import Case, CaseGroup, keys, run_groups
from omni_kernels._backend import resolve
from omni_kernels.testing import Record, bench_main
from omni_model.config import OmniConfig
from omni_model.hf_compat import hf_config
from omni_model.layers.backend import use_backend
from omni_model.models.vision_encoder import VisionEncoder, vision_layout

SEED = 0
BASELINE = "hf"
# (name, height, width, frames): the bench_window_attention shapes, and tiny ones for the CPU run.
INPUTS = (("image-1280x720", 720, 1280, 1), ("video-2s-448x252", 252, 448, 4))
INPUTS_QUICK = (("image-224x168", 168, 224, 1), ("video-4f-112x84", 84, 112, 4))


def encoder_flops(cfg, grids: list[tuple[int, int, int]]) -> float:
    """Matmul FLOPs of one forward of the encoder over ``grids`` (see the module docstring)."""
    d, inter, merge = cfg.hidden_size, cfg.intermediate_size, cfg.spatial_merge_size
    layout = vision_layout(grids, merge, cfg.window_size // merge // cfg.patch_size)
    n = int(layout.cu_window_seqlens[-1])
    patch = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
    windows = int(layout.cu_window_seqlens.diff().long().pow(2).sum())
    frames = int(layout.cu_frame_seqlens.diff().long().pow(2).sum())
    flops = 2.0 * n * patch * d
    for i in range(cfg.depth):
        pairs = frames if i in cfg.fullatt_block_indexes else windows
        flops += 2.0 * n * (4 * d * d + 3 * d * inter) + 4.0 * pairs * d
    width, tokens = d * merge**2, n // merge**2
    return flops + 2.0 * tokens * width * (width + cfg.out_hidden_size)


def _hf_encoder(cfg, ours: VisionEncoder, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """HF's encoder built on ``device`` in ``dtype`` at our config (through ``hf_compat.hf_config``), SDPA
    attention, with our weights copied in (every parameter checked by ``copy_into_hf``)."""
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniVisionEncoder

    with hf_build_context(dtype, device):  # also silences HF's config advisories
        vcfg = hf_config(cfg).thinker_config.vision_config
        vcfg._attn_implementation = "sdpa"
        hf = Qwen2_5OmniVisionEncoder(vcfg)
    hf = hf.requires_grad_(False).eval()
    copy_into_hf(ours, hf, what="HF vision encoder")
    return hf


def _pixels(grids: list[tuple[int, int, int]], cfg, device: torch.device) -> torch.Tensor:
    n = sum(t * h * w for t, h, w in grids)
    gen = torch.Generator().manual_seed(SEED + n)
    patch = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
    return torch.randn(n, patch, generator=gen).to(device)  # the processor's normalised patches, fp32


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.double().abs().max().item()
    return (out.double() - ref.double()).abs().max().item() / max(scale, 1e-30)


def _label(cfg, preset_name: str, name: str, grid: tuple[int, int, int]) -> str:
    t, h, w = grid
    tokens = t * h * w // cfg.thinker_config.vision_config.spatial_merge_size**2
    return f"vit-{preset_name} {name} grid={t}x{h}x{w} ({t * h * w} patches -> {tokens} tokens)"


def case_groups(device: str = "cuda", quick: bool = False, preset: str = "qwen2.5-omni-7b") -> list[CaseGroup]:
    """One group per input (hf, omni, omni-torch); both encoders are built with the first group and shared."""
    dev = torch.device(device)
    preset = preset_for(dev, preset)  # the tiny preset on CPU
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cfg = OmniConfig.preset(preset)

    @functools.cache
    @torch.inference_mode()
    def encoders() -> tuple[VisionEncoder, torch.nn.Module | None, BaseException | None]:
        ours = build_random(lambda: VisionEncoder(cfg.thinker_config.vision_config), dtype=dtype, device=dev,
                            seed=SEED)
        try:
            return ours, _hf_encoder(cfg, ours, dtype, dev), None
        except Exception as exc:  # transformers missing or its API moved: the hf rows say so
            return ours, None, exc

    def build(name: str, grid: tuple[int, int, int], label: str) -> list[Case]:
        return _input_cases(cfg, *encoders(), name, grid, label, dtype, dev, quick)

    groups = []
    for name, height, width, frames in INPUTS if dev.type == "cuda" else INPUTS_QUICK:
        grid = vision_grid(height, width, frames)
        label = _label(cfg, short_name(preset), name, grid)
        groups.append(CaseGroup(keys("vision_encoder", (BASELINE, "omni", "omni-torch"), label, dtype),
                                partial(build, name, grid, label)))
    return groups


def run(device: str = "cuda", quick: bool = False, preset: str = "qwen2.5-omni-7b") -> list[Record]:
    return run_groups(case_groups(device, quick, preset), device)


@torch.inference_mode()
def _input_cases(cfg, ours: VisionEncoder, hf: torch.nn.Module | None, hf_error: BaseException | None, name: str,
                 grid: tuple[int, int, int], label: str, dtype: torch.dtype, dev: torch.device,
                 quick: bool) -> list[Case]:
    vcfg = cfg.thinker_config.vision_config
    grids = [grid]
    pixels = _pixels(grids, vcfg, dev)
    grid_thw = torch.tensor(grids, dtype=torch.int64, device=dev)
    flops = encoder_flops(vcfg, grids)

    def case(provider: str, fn: Callable[[], object], error: BaseException | None, **extra) -> Case:
        # catch: a provider that fails is recorded, not raised, and the other providers go on.
        return Case("vision_encoder", provider, label, dtype, fn, flops=flops, baseline=BASELINE, extra=extra,
                    warmup=2 if quick else 5, rep=3 if quick else 30, max_seconds=2 if quick else 10,
                    peak_memory=True, error=error, catch=True)

    @torch.inference_mode()
    def hf_call():
        return hf(pixels, grid_thw)

    ref, error = None, hf_error
    if hf is not None:
        try:
            ref = hf_call()
        except Exception as exc:
            error = exc
    cases = [case(BASELINE, hf_call, error,
                  hf_attn_implementation=hf.config._attn_implementation if hf is not None else None)]

    for provider, backend in (("omni", None), ("omni-torch", "torch")):
        @torch.inference_mode()
        def call(backend=backend):
            with use_backend(backend):
                return ours(pixels, grids)

        extra, error = {"attention_backend": resolve("window_attention", dev, backend)}, None
        try:
            out = call()  # the parity check, once per input, before timing
            if ref is not None:
                extra["max_rel_err_vs_hf"] = _rel_err(out, ref)
        except Exception as exc:
            error = exc
        cases.append(case(provider, call, error, **extra))
    return cases


if __name__ == "__main__":
    bench_main(run, __doc__)
