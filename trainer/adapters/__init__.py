"""The adapter toolkit: fused exact blending, merging, resizing, baking, analysis and generation.

Everything works on `trainer.lora_state.Adapter` (layers keyed by kohya module name), so it does not care which
file format an adapter came from. Imports are lazy so `import trainer.adapters` stays cheap for the CLI.
"""
from __future__ import annotations

from trainer.lazy import lazy_getattr

_EXPORTS = {
    "FusedBlender": "blend", "merge_exact": "merge", "merge_svd": "merge", "save_merged": "merge",
    "resize": "resize",
    "bake": "bake", "save_single_file": "bake", "save_diffusers": "bake", "fuse_into": "bake",
    "analyze": "analyze", "spectrum": "analyze", "subspace_similarity": "analyze", "effective_rank": "analyze",
    "Generator": "generate",
}

__all__ = list(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)
