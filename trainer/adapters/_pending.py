"""SHIM — remove when `trainer.formats` and `trainer.models` land.

The adapter toolkit is written against the formats and models engineers' APIs (`load_adapter`, `save_adapter`,
`module_index`, `AdapterFormatError`, `load_base_model`, `ModelLoadError`). Each name below is theirs when their package imports,
and a minimal stand-in otherwise, so this package and its tests run before theirs exist. Once both packages are in,
import from them directly and delete this file.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

try:
    from trainer.formats import AdapterFormatError, load_adapter, module_index, save_adapter
except ImportError:  # SHIM until trainer.formats lands
    class AdapterFormatError(ValueError):
        """A file that is not a readable adapter; the message names the file and the fix."""

    def module_index(unet, text_encoders=None) -> dict:
        """{kohya_name: (prefix, module_path, module)} for every Linear/Conv2d of the UNet and text encoders."""
        out = {}
        for prefix, model in [("lora_unet", unet), *(text_encoders or {}).items()]:
            # transformers 5 dropped the `text_model.` level; kohya names keep it
            lead = "text_model." if prefix.startswith("lora_te") and not hasattr(model, "text_model") else ""
            for path, module in model.named_modules():
                if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                    out[f"{prefix}_{(lead + path).replace('.', '_')}"] = (prefix, path, module)
        return out

    def load_adapter(path) -> "Adapter":  # noqa: F821
        from safetensors import safe_open

        from trainer.lora_state import Adapter, LoraLayer
        path = Path(path)
        if not path.is_file():
            raise AdapterFormatError(f"{path} does not exist; give the path of a .safetensors adapter")
        with safe_open(str(path), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = dict(f.metadata() or {})
        layers = {}
        for key in tensors:
            if key.endswith(".lora_down.weight"):
                name = key[: -len(".lora_down.weight")]
                alpha = tensors.get(f"{name}.alpha")
                layers[name] = LoraLayer(tensors[key], tensors[f"{name}.lora_up.weight"],
                                         None if alpha is None else float(alpha))
        if not layers:
            raise AdapterFormatError(f"{path} holds no kohya LoRA layers (*.lora_down.weight)")
        return Adapter(layers, metadata)

    def save_adapter(adapter, path, format="kohya", dtype="fp16", metadata=None) -> Path:
        from safetensors.torch import save_file
        dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
        tensors = {}
        for name, layer in adapter.layers.items():
            tensors[f"{name}.lora_down.weight"] = layer.down.to(dt).contiguous()
            tensors[f"{name}.lora_up.weight"] = layer.up.to(dt).contiguous()
            if layer.alpha is not None:
                tensors[f"{name}.alpha"] = torch.tensor(float(layer.alpha)).to(dt)
        meta = {**adapter.metadata, **(metadata or {})}
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
        return path

try:
    from trainer.models import ModelLoadError, load_base_model
except ImportError:  # SHIM until trainer.models lands
    class ModelLoadError(Exception):
        """A base model that cannot be loaded; the message names the path and the fix."""

    @dataclass
    class _Base:
        unet: object
        vae: object
        text_encoder: object
        tokenizer: object
        noise_scheduler: object
        family: str = "sd1"
        text_encoders: dict = field(default_factory=dict)

        def pipeline(self):
            from diffusers import StableDiffusionPipeline
            return StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                           unet=self.unet, scheduler=self.noise_scheduler, safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)

    def load_base_model(path: str = "", **kwargs) -> _Base:
        from diffusers import StableDiffusionPipeline
        folder = Path(path) if path else Path(__file__).resolve().parents[1] / "assets" / "tiny-sd"
        if not (folder / "model_index.json").is_file():
            raise ModelLoadError(f"{folder} is not a diffusers model folder (no model_index.json)")
        pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, local_files_only=True)
        return _Base(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler,
                     text_encoders={"lora_te": pipe.text_encoder})
