"""LoRA files: kohya <-> diffusers <-> peft key maps, ss_*/modelspec metadata, reading foreign files, writing ours.

Everything goes through `trainer.lora_state.Adapter` (layers keyed by kohya module name).
"""
from __future__ import annotations

from pathlib import Path

from .check import align_to_model, check_adapter, check_against_model, delta_shape
from .errors import AdapterFormatError
from .from_model import adapter_from_model
from .layout import DTYPES, FORMATS
from .metadata import build_metadata
from .names import diffusers_aliases, kohya_name, module_index, normalise_kohya_name, resolve_paths
from .read import detect_format, load_adapter
from .write import as_saved, save_adapter, write_atomically

__all__ = ["AdapterFormatError", "DTYPES", "FORMATS", "adapter_from_model", "align_to_model", "as_saved", "build_metadata",
           "check_adapter", "check_against_model", "delta_shape", "detect_format", "export_adapter", "kohya_name", "load_adapter",
           "diffusers_aliases", "module_index", "normalise_kohya_name", "resolve_paths", "save_adapter",
           "write_atomically"]


def export_adapter(source, out_path, format: str = "kohya", dtype: str = "fp16", index: dict | None = None) -> Path:
    """Re-write any readable LoRA (a file, a checkpoint or a run folder) in our kohya or diffusers layout, metadata
    carried over. A run's adapter is written with the module names of the run's own base model."""
    from trainer.runs import run_model_index
    if index is None and format == "diffusers":
        index = run_model_index(source)
    return save_adapter(load_adapter(source), out_path, format=format, dtype=dtype, index=index)
