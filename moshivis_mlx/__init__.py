"""moshivis-mlx: Kyutai's MoshiVis vision-speech model in MLX."""

from .bundle import load_lm, load_mimi, load_vision
from .generate import Generator, StepOutput
from .image import ImageEncoder, ImageError, load_image
from .loader import BundleOptions, Loaded, load
from .models.lm import LM, LmConfig
from .models.mimi import Mimi, MimiConfig
from .sampling import Sampler

__all__ = [
    "load", "Loaded", "BundleOptions",
    "LM", "LmConfig", "Generator", "Sampler", "StepOutput", "load_lm",
    "Mimi", "MimiConfig", "load_mimi",
    "ImageEncoder", "ImageError", "load_image", "load_vision",
]
__version__ = "0.1.0"
