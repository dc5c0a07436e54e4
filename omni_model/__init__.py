"""omni_model: Qwen2.5-Omni (Thinker-Talker) on the omni_kernels ops, served by a continuous-batching engine."""

from omni_model.config import OmniConfig
from omni_model.engine.config import EngineConfig
from omni_model.engine.engine import OmniEngine
from omni_model.engine.request import RequestOutput
from omni_model.generation import GenerateOutput, StreamEvent
from omni_model.model import OmniModel
from omni_model.rope_index import get_rope_index

# Samples per second of every waveform the model makes (BigVGAN: 240 samples per mel frame, 100 frames per second).
SAMPLE_RATE = 24000

__all__ = ["EngineConfig", "GenerateOutput", "OmniConfig", "OmniEngine", "OmniModel", "RequestOutput", "SAMPLE_RATE",
           "StreamEvent", "get_rope_index"]
