"""Inference: the per-layer params layout, compiled prefill / decode programs, sampling, shape
buckets, `Generator` / `generate()` for static batches and `Engine` for continuous batching."""
from .buckets import CROP_MULTIPLE, cache_bucket, crop_bucket, prompt_bucket, prompt_buckets
from .generator import Generation, Generator, generate
from .params import InferenceParams, abstract_inference_params, inference_config, prepare_params
from .sampling import GenerateError, Sampling, sample

__all__ = ["CROP_MULTIPLE", "GenerateError", "Generation", "Generator", "InferenceParams", "Sampling",
           "abstract_inference_params", "cache_bucket", "crop_bucket", "generate", "inference_config",
           "prepare_params", "prompt_bucket", "prompt_buckets", "sample"]
