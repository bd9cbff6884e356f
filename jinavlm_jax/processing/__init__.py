"""Input pipeline: images and prompts to the model inputs of the official jina-vlm processor (numpy only).

* `PreprocessConfig`: image settings, read from `preprocessor_config.json` (`from_hf`).
* `ImageProcessor`: one image -> crops [T, 729, 588], masks, token block, image_input_idx.
* `Processor`: tokenizer + chat template + placeholder expansion + batch collation (spec 6.1).
* `resize_bilinear`: torch-compatible bilinear resize (no antialias) in numpy.
"""
from .chat import render_chat
from .config import PreprocessConfig
from .errors import ImageInputError, PreprocessConfigError, ProcessingError, PromptError, TokenizerError
from .image import ImageProcessor, select_tiling, smart_resize, smart_resize_image
from .loading import load_rgb
from .processor import PROCESSOR_FILES, Processor
from .resize import resize_bilinear
from .tokenizer import TextTokenizer

__all__ = ["PROCESSOR_FILES", "PreprocessConfig", "ImageProcessor", "Processor", "TextTokenizer", "ProcessingError",
           "ImageInputError", "PromptError", "PreprocessConfigError", "TokenizerError", "load_rgb",
           "render_chat", "resize_bilinear", "select_tiling", "smart_resize", "smart_resize_image"]
