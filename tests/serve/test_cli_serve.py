"""``omni serve --model``: a hub id resolves through huggingface_hub's cache, offline too; bad values fail clearly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from omni_model.cli import main

RESOLVE = "from omni_model.serve.cli import resolve_model; print(resolve_model(sys.argv[1]))"


def _resolve(spec: str, cache: Path) -> subprocess.CompletedProcess:
    # huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE when it is imported: a fresh interpreter.
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HOME": str(cache.parent / "hf-home"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", f"import sys; {RESOLVE}", spec], env=env, capture_output=True,
                          text=True, timeout=120)


def test_hub_id_resolves_offline_from_the_cache(tmp_path):
    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-omni"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "qwen2_5_omni"}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    done = _resolve("acme/tiny-omni", cache)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == snapshot
    missing = _resolve("acme/not-cached", cache)
    assert missing.returncode != 0 and "acme/not-cached" in missing.stderr and "hub" in missing.stderr


def test_bad_model_values(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "nowhere")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(["serve", "--model", "a/b/c"]) == 2
    assert "owner/name" in capsys.readouterr().err
