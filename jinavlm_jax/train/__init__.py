"""Training: YAML recipes (`config`), parameter-group AdamW (`optim`), the jitted step (`step`),
Orbax checkpoints (`checkpointing`), evaluation (`evaluate`), logs (`metrics`), the loop (`loop`),
the CPU demo (`demo`) and the `train.py` command line (`cli`)."""
from .config import TrainConfig, TrainConfigError, load_config

__all__ = ["TrainConfig", "TrainConfigError", "load_config"]
