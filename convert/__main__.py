"""python -m convert {hf-to-orbax, orbax-to-hf, from-components, check-logits, quantize, merge-lora}
(run from the repo root).

The repository's face of `jinavlm convert` (`jinavlm_jax/cli.py`): the same arguments, the same
output and exit codes: 0 success, 1 error (message on stderr), 2 bad arguments, 3 check-logits
above its threshold, 130 interrupted (nothing left looking complete).
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` and run one conversion; returns the exit code."""
    from jinavlm_jax.cli import COMMANDS
    from jinavlm_jax.command import run_cli
    return run_cli(COMMANDS["convert"], argv, "python -m convert")


if __name__ == "__main__":
    sys.exit(main())
