"""Errors of the input pipeline: all are `ValueError`s whose message names the input, the limit and the fix."""
from __future__ import annotations


class ProcessingError(ValueError):
    """Base class of every error raised by `jinavlm_jax.processing`."""


class PreprocessConfigError(ProcessingError):
    """A preprocessor_config.json value that the pipeline cannot represent (names the key and value)."""


class ImageInputError(ProcessingError):
    """An image that cannot be read or processed (names the file or input, its size and the limit)."""


class PromptError(ProcessingError):
    """A prompt, conversation or batch that does not fit the model (placeholders, lengths, roles)."""


class TokenizerError(ProcessingError):
    """A tokenizer file that lacks a special token the pipeline needs, or encodes it to several ids."""
