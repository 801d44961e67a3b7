"""Hub ids ("owner/name"): fetched into the local hub cache as a diffusers folder, or a clear offline error."""
from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import ModelLoadError
from .detect import CHECKPOINT_SUFFIXES

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# the files a Stable Diffusion 1.x training needs: configs, tokenizer and safetensors weights (no .ckpt/.bin,
# no fp16 variants, no safety checker), so a download stays at the size of one model
ALLOW_PATTERNS = ["model_index.json", "scheduler/*.json", "tokenizer/*", "*/config.json",
                  "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                  "text_encoder/model.safetensors"]


def looks_like_hub_id(path: str) -> bool:
    """'owner/name' that is not a local path someone mistyped (its first part is not a local folder)."""
    if not HUB_ID.match(path) or path.lower().endswith(CHECKPOINT_SUFFIXES):
        return False
    return not Path(path.split("/")[0]).is_dir()


def hub_offline() -> bool:
    """Downloads are off when HF_HUB_OFFLINE is set now or was set when huggingface_hub was imported."""
    from huggingface_hub import constants
    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def fetch_hub_model(hub_id: str) -> Path:
    """The local folder of a hub model: from the cache, or downloaded when the hub can be reached."""
    from huggingface_hub import snapshot_download
    offline = hub_offline()
    try:
        return Path(snapshot_download(hub_id, allow_patterns=ALLOW_PATTERNS, local_files_only=offline))
    except Exception as err:  # noqa: BLE001 - any failure here (offline, DNS, HTTP 401/404, disk) means "not available"
        why = ("hub downloads are off (HF_HUB_OFFLINE=1) and it is not in the local cache" if offline
               else f"it could not be downloaded ({type(err).__name__}: {_first_line(err)})")
        raise ModelLoadError(
            f"model.path {hub_id!r} is not a local file or folder, and {why}. Give a local path instead: a diffusers "
            f"folder (with model_index.json) or a .safetensors checkpoint; empty means the built-in tiny model"
        ) from err


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:300] if lines else "no details"
