#!/usr/bin/env python3
"""Train jina-vlm: `python train.py [RECIPE.yaml] [key=value ...]` (no arguments: the CPU demo).

See `python train.py --help` and `jinavlm_jax/train/cli.py`.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from jinavlm_jax.train.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
