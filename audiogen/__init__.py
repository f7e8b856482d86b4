"""audiogen: text-to-audio generation with AudioGen/MusicGen-style models, fast and at scale.

    from audiogen import AudioGen
    model = AudioGen.from_pretrained("path/to/checkpoint")   # audiocraft, transformers or audiogen format
    model = AudioGen.default()                               # or the embedded demo model
    clips = model.generate(["a dog barking in the rain"], duration=5.0, seed=1)
"""

from audiogen.config import AudioGenConfig
from audiogen.engine import Engine, EngineSnapshot, GenerationRequest, GenerationResult
from audiogen.errors import (CheckpointError, EngineClosedError, InvalidConfigError, InvalidRequestError,
                             MissingCheckpointFileError, QueueFullError, RequestCancelledError)
from audiogen.model import AudioGen
from audiogen.sampling_params import SamplingParams

__all__ = [
    "AudioGen", "AudioGenConfig", "CheckpointError", "Engine", "EngineClosedError", "EngineSnapshot",
    "GenerationRequest", "GenerationResult", "InvalidConfigError", "InvalidRequestError",
    "MissingCheckpointFileError", "QueueFullError", "RequestCancelledError", "SamplingParams",
]
__version__ = "0.1.0"
