"""Training data: the TFDS builder for local conversations (`builder`), grain pipelines (`pipeline`),
the synthetic multilingual VQA corpus (`synthetic`) and the demo tokenizer (`tokenizer`)."""
from .builder import DataError, build_dataset, open_split

__all__ = ["DataError", "build_dataset", "open_split"]
