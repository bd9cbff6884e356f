"""`python -m jinavlm_jax.tpu ...` = `jinavlm aot ...` (the docs/tpu.md generator runs each case so)."""
import sys

from .cli import main

sys.exit(main())
