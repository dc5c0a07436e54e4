"""get_rope_index: TMRoPE position ids of a long video-with-audio prompt, ours against HF's (host time).

The prompt: a 10-minute video with its audio (``use_audio_in_video``), the case where HF's per-token Python loop
(``get_chunked_index`` indexes a tensor once per video and audio token) costs the most.
* Video: sampled at 2 fps (HF's processor default), temporal patch 2, so 1.0 s per grid and 600 grids; frames
  resized to 448 x 252 (a 16:9 frame at about 113k pixels, multiples of 28 as the Qwen2.5 vision preprocessing
  needs): 32 x 18 patches of 14 px, merged 2 x 2 to 16 x 9 = 144 tokens per grid, 86,400 video tokens in all.
  (qwen-vl-utils style preprocessing may cap the frames or pixels of a long video; this shape is a stress test.)
* Audio: 600 s of 16 kHz audio, hop 160, 60,000 mel frames, 15,000 tokens (25 per second).
* Interleaved in 2 s chunks (50 temporal ids) as HF's processor lays them out, plus a short text before and after.
``quick`` uses the first minute (60 grids, 6,000 mel frames).

Providers: ``hf`` (transformers 4.57.6's method, called unbound on a namespace that carries the attributes it reads;
skipped when transformers is missing) and ``omni`` (omni_model.rope_index). Both run on the CPU: this is host-side
index math whatever the device (the result is moved to ``device`` once). ``speedup`` on the omni record is HF's
p50 over ours.
"""

from __future__ import annotations

import argparse
import functools
import json
import types

import torch

from omni_benchmarks.cases import Case, CaseGroup, keys, run_groups
from omni_model.rope_index import audio_token_count, get_rope_index

# Qwen2.5-Omni token ids (the get_rope_index defaults).
IDS = dict(image_token_id=151655, video_token_id=151656, audio_token_id=151646, vision_start_token_id=151652,
           audio_start_token_id=151647, audio_end_token_id=151648)
VISION_END = 151653
SECONDS_PER_GRID = 1.0  # temporal patch 2 / 2 fps
GRID_HW = (18, 32)  # 252 x 448 px in 14 px patches
MEL_PER_SECOND = 100  # 16 kHz, hop 160
PER_SECOND, PER_CHUNK, MERGE = 25, 2, 2


def video_prompt(seconds: int) -> dict:
    """get_rope_index inputs of a ``seconds`` long video with its audio, laid out as HF's processor does."""
    grids = int(seconds / SECONDS_PER_GRID)
    h, w = GRID_HW
    per_grid = (h // MERGE) * (w // MERGE)
    mel = seconds * MEL_PER_SECOND
    n_audio = audio_token_count(mel)
    tokens_per_chunk = PER_SECOND * PER_CHUNK
    t_ids = (torch.arange(grids) * SECONDS_PER_GRID * PER_SECOND).long()
    # The processor's chunking advances one chunk per token at most; with 25 ids per grid it never has to lag, so
    # the chunk of a token is simply its temporal id // 50.
    assert SECONDS_PER_GRID * PER_SECOND <= tokens_per_chunk
    video_chunk = (t_ids // tokens_per_chunk).repeat_interleave(per_grid)
    audio_chunk = torch.arange(n_audio) // tokens_per_chunk
    # Chunk j: its video tokens, then its audio tokens (stable sort keeps each stream in order).
    keys = torch.cat([2 * video_chunk, 2 * audio_chunk + 1])
    tokens = torch.cat([torch.full_like(video_chunk, IDS["video_token_id"]),
                        torch.full_like(audio_chunk, IDS["audio_token_id"])])
    body = tokens[torch.sort(keys, stable=True).indices]
    before = torch.arange(1000, 1020)  # system prompt and user turn stand-ins
    after = torch.arange(2000, 2010)
    ids = torch.cat([before, torch.tensor([IDS["vision_start_token_id"], IDS["audio_start_token_id"]]), body,
                     torch.tensor([IDS["audio_end_token_id"], VISION_END]), after])
    return dict(
        input_ids=ids.view(1, -1),
        attention_mask=torch.ones(1, ids.numel(), dtype=torch.int64),
        video_grid_thw=torch.tensor([[grids, h, w]]),
        audio_seqlens=torch.tensor([mel]),
        second_per_grids=torch.tensor([SECONDS_PER_GRID]),
        use_audio_in_video=True,
    )


@functools.cache
def _hf_get_rope_index():
    try:
        from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (
            Qwen2_5OmniPreTrainedModelForConditionalGeneration as HFBase,
        )
    except ImportError:
        return None
    obj = types.SimpleNamespace(
        spatial_merge_size=MERGE,
        config=types.SimpleNamespace(**IDS, position_id_per_seconds=PER_SECOND, seconds_per_chunk=PER_CHUNK),
    )
    obj.get_llm_pos_ids_for_vision = types.MethodType(HFBase.get_llm_pos_ids_for_vision, obj)
    obj.get_chunked_index = types.MethodType(HFBase.get_chunked_index, obj)
    return types.MethodType(HFBase.get_rope_index, obj)


def _shape(seconds: int, inputs: dict) -> str:
    grid = tuple(inputs["video_grid_thw"][0].tolist())
    return (f"video {grid} @{SECONDS_PER_GRID}s + audio {seconds * MEL_PER_SECOND} mel, "
            f"L={inputs['input_ids'].shape[1]}")


def case_groups(device: str = "cpu", quick: bool = False, preset: str | None = None) -> list[CaseGroup]:
    """One group: ours, then HF's (when transformers imports), on the prompt of ``quick`` (``preset`` is accepted
    for ``omni bench`` and not used: no model shapes). The prompt is built here, host-side and cheap, for the label."""
    seconds = 60 if quick else 600
    inputs = video_prompt(seconds)
    shape = _shape(seconds, inputs)
    hf_fn = _hf_get_rope_index()

    def build() -> list[Case]:
        ours_fn = lambda: get_rope_index(**inputs, spatial_merge_size=MERGE, position_id_per_seconds=PER_SECOND,
                                         seconds_per_chunk=PER_CHUNK, **IDS)[0].to(device)
        # threads: torch's intra-op threads; on a loaded host they can cost more than they save on 100k-element ops.
        # Both run on the CPU clock whatever the device: this is host-side index math.
        cases = [Case("rope_index", "omni", shape, torch.int64, ours_fn, baseline="hf" if hf_fn else None,
                      warmup=2, rep=20, timer_device="cpu", flush_l2=False,
                      finish=lambda rec: rec.extra.update(threads=torch.get_num_threads()))]
        if hf_fn is not None:
            pos, delta = ours_fn(), get_rope_index(**inputs, **IDS)[1]
            hf_pos, hf_delta = hf_fn(**inputs)
            if not (torch.equal(pos.cpu(), hf_pos) and torch.equal(delta, hf_delta)):
                raise AssertionError("rope_index bench: our position ids differ from HF's on the bench prompt")
            # HF takes seconds per call: one untimed call, then at least 3 timed ones (do_bench's floor).
            cases.append(Case("rope_index", "hf", shape, torch.int64, lambda: hf_fn(**inputs)[0].to(device),
                              warmup=0, rep=3, max_seconds=1.0, timer_device="cpu", flush_l2=False,
                              finish=lambda rec: rec.extra.update(threads=torch.get_num_threads())))
        return cases

    return [CaseGroup(keys("rope_index", ["omni", *(["hf"] if hf_fn else [])], shape, torch.int64), build)]


def run(device: str = "cpu", quick: bool = False, preset: str | None = None) -> list[dict]:
    """Contract benchmark records (``preset`` is accepted for ``omni bench`` and not used: no model shapes)."""
    return [r.to_dict() for r in run_groups(case_groups(device, quick, preset), device)]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(json.dumps(run(args.device, args.quick), indent=1))
