"""moshivis-mlx: Kyutai's MoshiVis vision-speech model in MLX."""

from .bundle import load_lm, load_mimi
from .generate import Generator, StepOutput
from .models.lm import LM, LmConfig
from .models.mimi import Mimi, MimiConfig
from .sampling import Sampler

__all__ = [
    "LM", "LmConfig", "Generator", "Sampler", "StepOutput", "load_lm",
    "Mimi", "MimiConfig", "load_mimi",
]
__version__ = "0.1.0"
