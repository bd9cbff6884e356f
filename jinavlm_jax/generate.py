"""Text generation (the public face kept from before the `inference` package existed).

    from jinavlm_jax.generate import generate, Generator, Sampling

The implementation lives in `jinavlm_jax.inference`: params layout (`params.py`), compiled programs
(`programs.py`), sampling (`sampling.py`), buckets (`buckets.py`), `Generator` (`generator.py`) and
the continuous-batching `Engine` (`engine.py`).
"""
from .inference.buckets import CROP_MULTIPLE, cache_bucket, crop_bucket, prompt_bucket
from .inference.generator import Generation, Generator, generate
from .inference.params import InferenceParams, abstract_inference_params, prepare_params
from .inference.programs import CACHE_AXES
from .inference.sampling import GenerateError, Sampling

__all__ = ["CACHE_AXES", "CROP_MULTIPLE", "GenerateError", "Generation", "Generator", "InferenceParams", "Sampling",
           "abstract_inference_params", "cache_bucket", "crop_bucket", "generate", "prepare_params", "prompt_bucket"]
