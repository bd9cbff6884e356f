"""TPU readiness from any host: libtpu's compile-only devices, the real programs compiled for them.

| module | owns |
|---|---|
| `topology` | topology names -> chips (`flops.CHIPS`), compile-only devices, the physical mesh |
| `count` | matmul FLOPs of a jaxpr, every loop iteration counted |
| `jobs` | the train step / prefill / decode on abstract full-size state; compile and measure |
| `cli` | `jinavlm aot` |

The FLOP formulas and the chip table live in `jinavlm_jax.flops` (training's MFU uses them too).
"""
from .count import JaxprFlops, count_flops
from .jobs import DoesNotFit, Job, compile_job, decode_job, load_recipe, prefill_job, train_job
from .topology import AOTError, build_mesh, compile_only_devices, libtpu_available, parse_topology

__all__ = ["AOTError", "DoesNotFit", "Job", "JaxprFlops", "build_mesh", "compile_job", "compile_only_devices",
           "count_flops", "decode_job", "libtpu_available", "load_recipe", "parse_topology", "prefill_job",
           "train_job"]
