"""moshivis-mlx: Kyutai's MoshiVis vision-speech model in MLX."""

from .bundle import load_lm, load_vision
from .generate import Generator, StepOutput
from .image import ImageEncoder, ImageError, load_image
from .models.lm import LM, LmConfig
from .sampling import Sampler

__all__ = [
    "LM", "LmConfig", "Generator", "Sampler", "StepOutput", "load_lm",
    "ImageEncoder", "ImageError", "load_image", "load_vision",
]
__version__ = "0.1.0"
