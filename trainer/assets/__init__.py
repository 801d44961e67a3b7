"""Assets shipped inside the ``trainer`` package.

``TINY_SD_PATH`` is loradesk's offline tiny Stable Diffusion base model: a standard diffusers folder
(``StableDiffusionPipeline.from_pretrained(TINY_SD_PATH)`` loads it) built by ``tools/build_tiny_base.py``.
See ``tiny-sd/README.md`` for what it is and how well it draws.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["ASSETS_DIR", "TINY_SD_PATH", "tiny_model_available"]

ASSETS_DIR: Path = Path(__file__).resolve().parent
TINY_SD_PATH: Path = ASSETS_DIR / "tiny-sd"

_REQUIRED = (
    "model_index.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "scheduler/scheduler_config.json",
)


def tiny_model_available() -> bool:
    """True when the tiny base model folder is present and complete (weights included)."""
    if not all((TINY_SD_PATH / p).is_file() for p in _REQUIRED):
        return False
    return all(any((TINY_SD_PATH / sub).glob("*.safetensors")) for sub in ("unet", "vae", "text_encoder"))
