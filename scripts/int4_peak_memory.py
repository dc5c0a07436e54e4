"""GPU peak memory of the int4 7B with audio output and a 15 s video prompt, without CPU offload.

Run on a CUDA machine::

    python scripts/int4_peak_memory.py --model /path/to/Qwen2.5-Omni-7B-AWQ      # a published int4 checkpoint
    python scripts/int4_peak_memory.py --random awq                            # random int4 weights, 7B shapes

The prompt is processor-shaped and synthetic (random pixels and mel features, no processor needed): a video of
``--seconds`` at ``--fps`` frames a second and ``--height`` x ``--width`` pixels (15 s, 2 fps, 252 x 448 by default:
a (15, 18, 32) patch grid, 2160 video tokens), its 15 s audio track as an audio segment (375 tokens), and a few
text ids; the reply is ``--text-tokens`` thinker tokens and ``--codes`` talker codes, spoken by Token2Wav. The KV
cache is sized to the request (``--kv-tokens``), so the figure is the model's, not a cache pool's.

Printed and written (``--json``): the bytes of every part as omni_model.memory computes them, torch's allocated
bytes after loading, and the peaks during ``generate`` (``max_memory_allocated``, ``max_memory_reserved``) plus
the device memory in use at the end (``mem_get_info``: everything on the device, the CUDA context included). The
issue's target: 10 GB. Random weights decode random ids and may stop before ``--text-tokens`` / ``--codes``
(a smaller run than asked): ``stopped_early`` says so.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from omni_model import OmniConfig, OmniModel
from omni_model.memory import PUBLISHED_QUANT, model_memory
from omni_model.models.audio_encoder import audio_token_lengths


def video_prompt(config: OmniConfig, *, seconds: float, fps: float, height: int, width: int, device) -> dict:
    th = config.thinker_config
    v = th.vision_config
    frames = max(v.temporal_patch_size, int(round(seconds * fps)))
    unit = v.patch_size * v.spatial_merge_size
    h, w = max(1, height // unit) * v.spatial_merge_size, max(1, width // unit) * v.spatial_merge_size
    grid = (frames // v.temporal_patch_size, h, w)
    patches = grid[0] * h * w
    pixels = torch.randn(patches, v.in_channels * v.temporal_patch_size * v.patch_size**2)
    mel_frames = int(seconds * 100)
    feats = torch.randn(1, th.audio_config.num_mel_bins, mel_frames)
    n_audio = int(audio_token_lengths(torch.tensor([mel_frames]))[0])
    n_video = patches // v.spatial_merge_size**2
    text = [i % th.text_config.vocab_size for i in range(1000, 1016)]  # plain text ids (tiny vocab too)
    ids = ([th.audio_start_token_id] + [th.audio_token_id] * n_audio + [th.audio_end_token_id]
           + [th.vision_start_token_id] + [th.video_token_id] * n_video + [th.vision_end_token_id] + text)
    return dict(input_ids=torch.tensor([ids], device=device),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                input_features=feats.to(device), feature_attention_mask=torch.ones(1, mel_frames, dtype=torch.long,
                                                                                   device=device),
                pixel_values_videos=pixels.to(device), video_grid_thw=torch.tensor([grid]),
                video_second_per_grid=torch.tensor([v.temporal_patch_size / fps]))


def load(args, device: torch.device) -> OmniModel:
    """The model, with its engine's KV caches sized to ``--kv-tokens``."""
    from omni_model import EngineConfig

    kwargs = dict(engine_config=EngineConfig(max_num_seqs=1, max_num_batched_tokens=args.kv_tokens,
                                             kv_cache_tokens=args.kv_tokens))
    if args.model:
        model = OmniModel.from_pretrained(args.model, device=device, dtype=torch.bfloat16, **kwargs)
    else:
        model = OmniModel.from_config(OmniConfig.preset(args.preset), device=device, dtype=torch.bfloat16,
                                      quantization=PUBLISHED_QUANT[args.random], **kwargs)
    return model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="an int4 checkpoint directory (AWQ GEMM or GPTQ v1)")
    src.add_argument("--random", choices=sorted(PUBLISHED_QUANT), help="random int4 weights of that layout")
    p.add_argument("--preset", default="qwen2.5-omni-7b")
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--fps", type=float, default=2.0)
    p.add_argument("--height", type=int, default=252)
    p.add_argument("--width", type=int, default=448)
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--codes", type=int, default=600, help="talker codes (about 12 s of speech)")
    p.add_argument("--kv-tokens", type=int, default=4096)
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("int4_peak_memory: needs a CUDA device (the CPU figures: python -m omni_model.memory)")
    device = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    model = load(args, device)
    torch.cuda.synchronize(device)
    loaded = torch.cuda.memory_allocated(device)
    load_peak = torch.cuda.max_memory_allocated(device)
    report = model_memory(model.config, model.quantization)
    inputs = video_prompt(model.config, seconds=args.seconds, fps=args.fps, height=args.height, width=args.width,
                          device=device)
    torch.cuda.reset_peak_memory_stats(device)
    t1 = time.perf_counter()
    out = model.generate(**inputs, thinker_max_new_tokens=args.text_tokens, talker_max_new_tokens=args.codes,
                         seed=0)
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    result = {
        "device": torch.cuda.get_device_name(device),
        "model": args.model or f"random {args.random} ({args.preset})",
        "quantization": None if model.quantization is None else model.quantization.to_dict(),
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "video_grid_thw": inputs["video_grid_thw"].tolist(),
        "reply_tokens": int(out.sequences.shape[1] - inputs["input_ids"].shape[1]),
        "codes": int(out.codes[0].numel()) if out.codes is not None else 0,
        "audio_seconds": float(out.audio[0].size / 24000) if out.audio is not None else 0.0,
        "stopped_early": bool(out.codes is None or out.codes[0].numel() < args.codes),
        "parts_bytes": dict(report.parts),
        "weights_bytes_computed": report.weights,
        "allocated_after_load": loaded,
        "peak_allocated_during_load": load_peak,
        "peak_allocated_generate": torch.cuda.max_memory_allocated(device),
        "peak_reserved_generate": torch.cuda.max_memory_reserved(device),
        "device_in_use_end": total - free,
        "load_s": t1 - t0,
        "generate_s": time.perf_counter() - t1,
        "target_bytes": 10 * 10**9,
    }
    print(report.table())
    for key, value in result.items():
        print(f"{key}: {value / 1e9:.3f} GB" if key.endswith(("_load", "_generate", "_end", "_bytes"))
              and isinstance(value, int) else f"{key}: {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
