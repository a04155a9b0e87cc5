"""moshivis-mlx: Kyutai's MoshiVis vision-speech model in MLX."""

from .bundle import load_lm
from .generate import Generator, StepOutput
from .models.lm import LM, LmConfig
from .sampling import Sampler

__all__ = ["LM", "LmConfig", "Generator", "Sampler", "StepOutput", "load_lm"]
__version__ = "0.1.0"
