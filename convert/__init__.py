"""`python -m convert` from the repository root: a thin face of `jinavlm convert` (not installed)."""
