"""Fixtures of the server tests (skipped without the server's packages)."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")
pytest.importorskip("transformers")


@pytest.fixture(scope="session")
def tiny_processor(tmp_path_factory):
    from omni_model.hf_compat import save_tiny_processor

    return save_tiny_processor(tmp_path_factory.mktemp("tiny_processor"))
