"""Checkpoint formats: safetensors I/O and the name tables that map them onto our params."""
from .official import load_jina_vlm, official_table, official_tensors
from .safetensors_io import CheckpointError, CheckpointReader, SafetensorsFile, write_safetensors

__all__ = ["load_jina_vlm", "official_table", "official_tensors", "CheckpointError", "CheckpointReader",
           "SafetensorsFile", "write_safetensors"]
