"""Captions written by a local model: Florence-2, BLIP, Qwen2.5-VL / Qwen3-VL (sentences, plain transformers) and
WD v3 taggers (tags, ONNX). `caption_dataset` writes, `preview_captions` only shows; both take a model folder, a
hub name, or a captioner `load_captioner` loaded once. Names are imported on first use: importing this package
loads neither torch nor onnxruntime."""
from __future__ import annotations

from trainer.lazy import lazy_getattr

_EXPORTS = {
    **dict.fromkeys(["caption_dataset", "preview_captions", "load_captioner", "CaptionOptions", "CaptionReport",
                     "CaptionResult"], "run"),
    **dict.fromkeys(["find_caption_model", "detect_kind", "CaptionModel", "KINDS", "MEMORY_HELP"], "detect"),
    "CaptionError": "errors",
}

__all__ = list(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
