"""omni_model: Qwen2.5-Omni (Thinker-Talker) on the omni_kernels ops."""

from omni_model.config import OmniConfig
from omni_model.model import OmniModel
from omni_model.rope_index import get_rope_index

__all__ = ["OmniConfig", "OmniModel", "get_rope_index"]
