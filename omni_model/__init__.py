"""omni_model: Qwen2.5-Omni (Thinker-Talker) on the omni_kernels ops, served by a continuous-batching engine."""

from omni_model.config import SAMPLE_RATE, OmniConfig
from omni_model.engine.config import EngineConfig
from omni_model.engine.engine import OmniEngine
from omni_model.engine.request import RequestOutput
from omni_model.generation import GenerateOutput, StreamEvent
from omni_model.model import OmniModel
from omni_model.rope_index import get_rope_index

__all__ = ["EngineConfig", "GenerateOutput", "OmniConfig", "OmniEngine", "OmniModel", "RequestOutput", "SAMPLE_RATE",
           "StreamEvent", "get_rope_index"]
