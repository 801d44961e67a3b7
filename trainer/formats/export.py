"""export_adapter: any readable LoRA re-written in our kohya or diffusers layout."""
from __future__ import annotations

from pathlib import Path

from .read import load_adapter
from .write import family_of, has_file_layout, save_adapter


def export_adapter(source, out_path, format: str = "auto", dtype: str = "fp16", index: dict | None = None) -> Path:
    """Re-write any readable LoRA (a file, a checkpoint or a run folder) in our kohya or diffusers layout ("auto":
    the one the most programs load for its family, Family.layouts' first), metadata carried over. A run's adapter is written with the module names of the run's own base model (for the kohya
    layout too where the family fuses modules in its files: the widths of parts it lacks come from that model)."""
    from trainer.runs import run_model_index
    adapter = load_adapter(source)
    family = family_of(adapter)
    format = family.layout(format)
    if index is None and (format == "diffusers" or has_file_layout(family)):
        index = run_model_index(source)
    return save_adapter(adapter, out_path, format=format, dtype=dtype, index=index, family=family)
