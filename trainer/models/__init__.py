"""Base models: loading a diffusers folder, a single-file checkpoint (offline, with local configs) or a hub id.

`load_base_model(path)` finds out what `path` is, detects the model family (model_index.json, or the checkpoint's
keys), lets the family module (`sd1.py`) load the components, then freezes them (`load.py`). `info.py` answers what
the app needs to know before any weights load (the model's native size, training defaults) from its config files.
Names are imported on first use, so `trainer.models.info` and `errors` stay free of torch.
"""
from __future__ import annotations

from trainer.lazy import lazy_getattr

_EXPORTS = {
    "BaseModel": "base", "ModelLoadError": "errors", "SUPPORTED_FAMILIES": "load", "load_base_model": "load",
    "resolve_model_path": "info", "native_resolution": "info", "training_defaults": "info", "family_name": "info",
    "model_summary": "info",
    "get_family": "detect", "family_of_adapter": "detect", "adapter_family": "detect", "default_family": "detect", "meta_index": "meta", "adapter_index": "meta",
    "model_index": "meta", "SizeInfo": "family",
}

__all__ = list(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)
