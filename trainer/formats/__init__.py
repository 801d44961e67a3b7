"""LoRA files: kohya <-> diffusers <-> peft key maps, ss_*/modelspec metadata, reading foreign files, writing ours.

Everything goes through `trainer.lora_state.Adapter` (layers keyed by kohya module name).
"""
from __future__ import annotations

from trainer.lazy import lazy_getattr

# Imported on first use (as trainer.models and trainer are): an eager import of every submodule here would run
# whenever any one of them is imported (a package's __init__ runs first), and would close a circle through
# formats.check -> models.meta -> formats.names.
_EXPORTS = {
    **dict.fromkeys(["align_to_model", "check_adapter", "check_against_model", "delta_shape"], "check"),
    "AdapterFormatError": "errors", "adapter_from_model": "from_model", "DTYPES": "layout", "FORMATS": "layout",
    "build_metadata": "metadata", "export_adapter": "export",
    **dict.fromkeys(["diffusers_aliases", "kohya_name", "module_index", "normalise_kohya_name", "resolve_paths"],
                    "names"),
    "detect_format": "read", "load_adapter": "read",
    **dict.fromkeys(["as_saved", "save_adapter", "write_atomically"], "write"),
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)
