"""Which captioner a model folder holds, from its files alone (no weights loaded), and what each needs in memory.

A folder is one of: a WD tagger (model.onnx + selected_tags.csv, SmilingWolf's layout), or a transformers folder
whose config.json model_type names the architecture. A hub name ("owner/name") is fetched into the hub cache first
when the machine reaches the hub (trainer.models.hub's rule for what a hub name looks like and when it is offline).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from trainer.paths import expand_path

from .errors import CaptionError

TAGGER_FILES = ("model.onnx", "selected_tags.csv")
# config.json model_type -> captioner kind
MODEL_TYPES = {"florence2": "florence2", "blip": "blip", "qwen2_5_vl": "qwen-vl", "qwen3_vl": "qwen-vl",
               "qwen2_vl": "qwen-vl"}
SENTENCE_KINDS = ("florence2", "blip", "qwen-vl")
KINDS = (*SENTENCE_KINDS, "wd-tagger")

# Memory for the weights alone (parameters x bytes per parameter; activations add a little at batch size 1).
# Parameter counts: the model cards and file sizes of the checkpoints named.
MEMORY_HELP = {
    "florence2": "Florence-2 (florence-community/Florence-2-base 0.23 B parameters: about 1 GB in fp32 on a CPU, "
                 "0.5 GB in fp16 on a GPU; -large 0.77 B: 3 GB / 1.6 GB)",
    "blip": "BLIP (Salesforce/blip-image-captioning-base 0.25 B: about 1 GB in fp32, 0.5 GB in fp16; -large "
            "0.47 B: 1.9 GB / 1 GB)",
    "qwen-vl": "Qwen2.5-VL / Qwen3-VL, the larger choice (Qwen3-VL-2B-Instruct about 4.5 GB in bf16, Qwen2.5-VL-3B "
               "7.5 GB, Qwen3-VL-4B 9 GB, 7B/8B 17 GB: a GPU; on a CPU fp32 doubles these and it is slow)",
    "wd-tagger": "a WD v3 tagger, ONNX (SmilingWolf/wd-vit-tagger-v3 about 0.4 GB on disk and 1 GB in memory, "
                 "wd-swinv2-tagger-v3 0.5 GB / 1 GB, wd-eva02-large-tagger-v3 1.3 GB / 2.5 GB; runs well on a CPU)",
}


@dataclass(frozen=True)
class CaptionModel:
    """A caption model found on disk: its folder and kind (one of KINDS)."""
    path: Path
    kind: str

    @property
    def mode(self) -> str:
        """What it writes: 'tags' for a tagger, 'sentence' for the others."""
        return "tags" if self.kind == "wd-tagger" else "sentence"


def find_caption_model(model: str | Path) -> CaptionModel:
    """The caption model `model` names: a local folder, or a hub name fetched when the hub is reachable."""
    text = str(model).strip()
    if not text:
        raise CaptionError("--model is empty: give a caption model folder (Florence-2, BLIP, Qwen-VL or a WD "
                           "tagger) or, online, its hub name such as florence-community/Florence-2-base")
    folder = expand_path(text)
    if not folder.is_dir():
        folder = _fetch(text)
    return CaptionModel(folder.resolve(), detect_kind(folder))


def detect_kind(folder: Path) -> str:
    """The captioner kind of a folder, or CaptionError saying what the folder lacks."""
    folder = Path(folder)
    if all((folder / name).is_file() for name in TAGGER_FILES):
        return "wd-tagger"
    if (folder / "model.onnx").is_file():
        raise CaptionError(f"{folder} has model.onnx but no selected_tags.csv: copy the tagger's selected_tags.csv "
                           f"beside it (it names the tags the model scores)")
    config = _read_config(folder)
    model_type = str(config.get("model_type", ""))
    if model_type == "florence2" and "auto_map" in config:
        # microsoft/Florence-2-* run their own code (trust_remote_code), which loradesk never runs
        raise CaptionError(f"{folder} is an original Florence-2 checkpoint that needs trust_remote_code; use the "
                           f"converted one for plain transformers, e.g. florence-community/Florence-2-base")
    if model_type not in MODEL_TYPES:
        raise CaptionError(f"{folder}/config.json has model_type {model_type!r}, which is not a caption model "
                           f"loradesk runs: use Florence-2 (florence2), BLIP (blip), Qwen2.5-VL/Qwen3-VL or a WD "
                           f"tagger folder (model.onnx + selected_tags.csv)")
    return MODEL_TYPES[model_type]


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise CaptionError(f"{folder} holds neither config.json (a transformers caption model) nor model.onnx + "
                           f"selected_tags.csv (a WD tagger): choose the model's folder")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CaptionError(f"{path} cannot be read ({e}); download the model again") from None
    if not isinstance(config, dict):
        raise CaptionError(f"{path} is not a model config (not a JSON object); download the model again")
    return config


# what a caption model needs from the hub: configs, tokenizer, processor, safetensors or ONNX weights, tag list
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "model.onnx", "selected_tags.csv"]


def _fetch(name: str) -> Path:
    from trainer.models.hub import hub_offline, looks_like_hub_id
    if not looks_like_hub_id(name):
        raise CaptionError(f"caption model {name} is not a folder: give the folder that holds the model's "
                           f"config.json (or a WD tagger's model.onnx and selected_tags.csv)")
    from huggingface_hub import snapshot_download
    offline = hub_offline()
    try:
        return Path(snapshot_download(name, allow_patterns=HUB_PATTERNS, local_files_only=offline))
    except Exception as err:  # noqa: BLE001 - offline, DNS, HTTP 401/404, disk: all mean "not available here"
        why = ("hub downloads are off (HF_HUB_OFFLINE=1) and it is not in the local cache" if offline
               else f"it could not be downloaded ({type(err).__name__})")
        raise CaptionError(f"caption model {name!r} is not a local folder, and {why}; download it on a machine "
                           f"that reaches the hub and give its folder") from None
