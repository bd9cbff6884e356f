"""`python -m convert`: the weight-conversion CLI (a thin wrapper over `jinavlm_jax.convert`)."""
