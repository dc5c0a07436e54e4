"""Reading a Qwen2.5-Omni checkpoint directory: safetensors tensors (one file, or shards with an index), the
speaker table ``spk_dict.pt``, and the one-error check of a state dict against the shapes a model expects.

Layout (what transformers' ``save_pretrained`` writes and the published checkpoints use)::

    config.json
    model.safetensors                                   (small checkpoints), or
    model-00001-of-0000N.safetensors ... + model.safetensors.index.json   {"weight_map": {key: shard file}}
    spk_dict.pt                                         {speaker: {"cond", "ref_mel", "bos_token"}}
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

__all__ = [
    "CheckpointError",
    "INDEX_FILE",
    "SINGLE_FILE",
    "SPEAKER_FILE",
    "check_state_dict",
    "checkpoint_files",
    "load_speakers",
    "load_state_dict",
    "module_shapes",
    "random_speakers",
]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SPEAKER_FILE = "spk_dict.pt"
_SHARD = re.compile(r"model-\d+-of-\d+\.safetensors")
# Above this many bytes to read, a progress bar is worth its line (the 7B checkpoint is ~22 GB in 5 shards).
PROGRESS_BYTES = 1 << 30


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; ``missing``, ``unexpected`` and ``mismatched`` list the keys
    (``mismatched``: key -> (expected shape, found shape))."""

    def __init__(self, message: str, *, missing: Iterable[str] = (), unexpected: Iterable[str] = (),
                 mismatched: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]] | None = None):
        super().__init__(message)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = dict(mismatched or {})


# ----------------------------------------------------------------------------------------------- tensors


def checkpoint_files(path: str | os.PathLike) -> dict[str, str]:
    """Key -> safetensors file of the checkpoint in directory ``path`` (or of the one ``.safetensors`` file
    ``path``), from the index, or from ``model.safetensors``. Raises FileNotFoundError naming what is missing
    (the index when shards exist without it; the directory's expected files when there are none)."""
    root = Path(path)
    if root.is_file() and root.suffix == ".safetensors":
        with safe_open(root, framework="pt") as f:
            return dict.fromkeys(f.keys(), str(root))
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint directory {root} does not exist")
    index = root / INDEX_FILE
    if index.is_file():
        try:
            with open(index, encoding="utf-8") as fh:
                weight_map = json.load(fh)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a safetensors index (a JSON object with a 'weight_map'): {e}") from e
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: 'weight_map' must map tensor names to shard files")
        return {key: str(root / shard) for key, shard in weight_map.items()}
    single = root / SINGLE_FILE
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return dict.fromkeys(f.keys(), str(single))
    shards = sorted(p.name for p in root.iterdir() if _SHARD.fullmatch(p.name))
    if shards:
        raise FileNotFoundError(f"{index} is missing: the shards {', '.join(shards)} cannot be read without it")
    raise FileNotFoundError(f"no checkpoint in {root}: expected {SINGLE_FILE} or {INDEX_FILE} with its shards")


def _wanted(key: str, prefixes: tuple[str, ...] | None) -> bool:
    return prefixes is None or key.startswith(prefixes)


def load_state_dict(
    path: str | os.PathLike,
    *,
    prefixes: str | Iterable[str] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    progress: bool | None = None,
) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors as ``{key: tensor}``.

    ``prefixes``: keep only keys starting with one of them (e.g. ``["thinker."]``); shards holding none of those
    keys are never opened. ``device``: where the tensors land (read straight there by safetensors).
    ``dtype``: cast floating-point tensors (integer tensors keep theirs). ``progress``: a tqdm bar; ``None``
    shows it for a large read (more than 1 GiB, or several shards totalling more than 64 MiB).

    Errors name the files: a shard the index points to that does not exist, a key the index places in a shard
    that lacks it, a missing index (FileNotFoundError) or a malformed one (ValueError).
    """
    if isinstance(prefixes, str):
        prefixes = (prefixes,)
    prefixes = None if prefixes is None else tuple(prefixes)
    files = checkpoint_files(path)
    by_file: dict[str, list[str]] = defaultdict(list)
    for key, file in files.items():
        if _wanted(key, prefixes):
            by_file[file].append(key)
    absent = sorted(f for f in by_file if not os.path.isfile(f))
    if absent:
        needed = sum(len(by_file[f]) for f in absent)
        raise FileNotFoundError(f"checkpoint {path}: {len(absent)} shard(s) named in {INDEX_FILE} do not exist: "
                                f"{', '.join(absent)} ({needed} tensors)")
    total = sum(os.path.getsize(f) for f in by_file)
    if progress is None:
        progress = total > PROGRESS_BYTES or (len(by_file) > 1 and total > PROGRESS_BYTES // 16)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(k) for k in by_file.values()), unit="tensor", desc=f"loading {Path(path).name}")
    device = torch.device(device)
    # safetensors takes "cpu", "cuda:0", ...: a bare "cuda" means the current device.
    target = f"cuda:{torch.cuda.current_device()}" if device.type == "cuda" and device.index is None else device
    out: dict[str, torch.Tensor] = {}
    try:
        for file in sorted(by_file):
            with safe_open(file, framework="pt", device=str(target)) as f:
                present = set(f.keys())
                lost = sorted(k for k in by_file[file] if k not in present)
                if lost:
                    raise ValueError(f"{file} lacks {len(lost)} tensor(s) that {INDEX_FILE} places there: "
                                     f"{', '.join(lost)}")
                for key in by_file[file]:
                    t = f.get_tensor(key)
                    if dtype is not None and t.is_floating_point():
                        t = t.to(dtype)
                    out[key] = t
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return out


# ----------------------------------------------------------------------------------------------- checks


def module_shapes(module: torch.nn.Module, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """``{prefix + name: shape}`` of a module's state dict (persistent buffers included); works on ``meta``."""
    return {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()}


def _shape(t: Any) -> tuple[int, ...]:
    return tuple(t.shape) if hasattr(t, "shape") else tuple(t)


def check_state_dict(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, Any], *,
                     what: str = "checkpoint") -> None:
    """Raises one :class:`CheckpointError` naming every missing, unexpected and mis-shaped tensor (with the
    expected and found shapes); returns quietly when ``found`` (tensors or shapes) matches ``expected``."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = {k: (tuple(expected[k]), _shape(found[k])) for k in sorted(set(expected) & set(found))
                  if _shape(found[k]) != tuple(expected[k])}
    if not (missing or unexpected or mismatched):
        return
    lines = [f"{what} does not match the model: {len(missing)} missing, {len(unexpected)} unexpected, "
             f"{len(mismatched)} mis-shaped tensor(s)"]
    lines += [f"  missing: {k} (expected shape {list(expected[k])})" for k in missing]
    lines += [f"  unexpected: {k} (shape {list(_shape(found[k]))})" for k in unexpected]
    lines += [f"  mis-shaped: {k}: expected {list(e)}, found {list(f)}" for k, (e, f) in mismatched.items()]
    raise CheckpointError("\n".join(lines), missing=missing, unexpected=unexpected, mismatched=mismatched)


# ----------------------------------------------------------------------------------------------- speakers


# The published speakers and their bos ids in the 7B/3B Thinker vocabulary.
PUBLISHED_SPEAKERS = {"Chelsie": 151872, "Ethan": 151870}


def random_speakers(config, *, seed: int = 0, ref_frames: int = 300) -> dict[str, dict[str, Any]]:
    """Stand-ins for ``spk_dict.pt`` of a random-weight model (``config``: an OmniConfig): Chelsie and Ethan with
    random ``cond`` (1, enc_emb_dim) and ``ref_mel`` (1, ref_frames, mel_dim) at a log-mel-like level (natural-log
    amplitudes around -5, quiet speech, spread 2). Their ``bos_token`` is the published one where the Thinker's
    vocabulary has it, else the tts text start id (a tiny vocabulary)."""
    dit = config.token2wav_config.dit
    vocab = config.thinker_config.text_config.vocab_size
    gen = torch.Generator().manual_seed(seed + 1)
    return {
        name: {
            "cond": torch.randn(1, dit.enc_emb_dim, generator=gen),
            "ref_mel": torch.randn(1, ref_frames, dit.mel_dim, generator=gen) * 2.0 - 5.0,
            "bos_token": bos if bos < vocab else config.talker_config.tts_text_start_token_id,
        }
        for name, bos in PUBLISHED_SPEAKERS.items()
    }


def load_speakers(path: str | os.PathLike, *, cond_dim: int | None = None,
                  mel_dim: int | None = None) -> dict[str, dict[str, Any]]:
    """The speaker table ``spk_dict.pt`` of checkpoint directory ``path`` (or the file itself):
    ``{name: {"cond": (1, D) tensor, "ref_mel": (1, T, mel) tensor, "bos_token": int}}``.

    ``cond`` stored as (D,) is returned as (1, D); a 0-d integer tensor ``bos_token`` as an int. With
    ``cond_dim`` / ``mel_dim`` (the DiT's ``enc_emb_dim`` / ``mel_dim``) the widths are checked too. Loaded with
    ``weights_only=True`` on the CPU: the file needs no code to unpickle, and none is run.
    """
    file = Path(path)
    if file.is_dir():
        file = file / SPEAKER_FILE
    if not file.is_file():
        raise FileNotFoundError(f"speaker file {file} does not exist (needed for audio output)")
    try:
        table = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file; report them as one
        raise ValueError(f"{file} is not a readable speaker table ({type(e).__name__}: {e})") from e
    if not isinstance(table, Mapping) or not table:
        raise ValueError(f"{file} must hold a non-empty dict {{speaker: entry}}, got {type(table).__name__}")
    speakers: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    for name, entry in table.items():
        try:
            speakers[str(name)] = _speaker(entry, cond_dim=cond_dim, mel_dim=mel_dim)
        except ValueError as e:
            problems.append(f"{name!r}: {e}")
    widths = {(s["cond"].shape[1], s["ref_mel"].shape[2]) for s in speakers.values()}
    if len(widths) > 1:
        problems.append(f"speakers disagree on (cond dim, mel dim): {sorted(widths)}")
    if problems:
        raise ValueError(f"{file}: invalid speaker entries:\n  " + "\n  ".join(problems))
    return speakers


def _speaker(entry: Any, *, cond_dim: int | None, mel_dim: int | None) -> dict[str, Any]:
    if not isinstance(entry, Mapping):
        raise ValueError(f"entry must be a dict with cond, ref_mel, bos_token; got {type(entry).__name__}")
    lacking = [k for k in ("cond", "ref_mel", "bos_token") if k not in entry]
    if lacking:
        raise ValueError(f"missing {', '.join(lacking)}")
    cond, ref_mel, bos = entry["cond"], entry["ref_mel"], entry["bos_token"]
    if not (isinstance(cond, torch.Tensor) and cond.is_floating_point() and (
            cond.dim() == 1 or (cond.dim() == 2 and cond.shape[0] == 1))):
        raise ValueError(f"cond must be a float tensor (1, D) or (D,), got {_describe(cond)}")
    cond = cond.reshape(1, -1)
    if not (isinstance(ref_mel, torch.Tensor) and ref_mel.is_floating_point() and ref_mel.dim() == 3
            and ref_mel.shape[0] == 1 and ref_mel.shape[1] > 0):
        raise ValueError(f"ref_mel must be a float tensor (1, T, mel) with T > 0, got {_describe(ref_mel)}")
    if isinstance(bos, torch.Tensor) and bos.numel() == 1 and not bos.is_floating_point():
        bos = int(bos.item())
    if not isinstance(bos, int) or isinstance(bos, bool) or bos < 0:
        raise ValueError(f"bos_token must be a non-negative int, got {bos!r}")
    if cond_dim is not None and cond.shape[1] != cond_dim:
        raise ValueError(f"cond has width {cond.shape[1]}, the model expects {cond_dim}")
    if mel_dim is not None and ref_mel.shape[2] != mel_dim:
        raise ValueError(f"ref_mel has {ref_mel.shape[2]} mel bins, the model expects {mel_dim}")
    return {"cond": cond, "ref_mel": ref_mel, "bos_token": bos}


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor {list(x.shape)} {x.dtype}"
    return type(x).__name__
