"""What every family's loader shares: loading one diffusers component with a clear error, fitting converted
single-file weights into models built from configs, tokenizers, schedulers and the inpainting refusal."""
from __future__ import annotations

from pathlib import Path

from typing import TYPE_CHECKING

from .errors import ModelLoadError, pickle_refused_message
from .family import CONFIGS
from .schedulers import training_scheduler

if TYPE_CHECKING:
    import torch

CLIP_BPE = CONFIGS / "sd15" / "tokenizer"  # OpenAI CLIP's BPE (vocab.json, merges.txt): every family's tokenizers


def vae_dtype(options: dict | None, dtype: torch.dtype) -> torch.dtype:
    """The VAE's dtype at load: the loader options' "vae_dtype" where the caller gave one (the training loop: fp32,
    so that BaseModel.place keeps a VAE that says force_upcast in full precision, as it was), else `dtype`."""
    return (options or {}).get("vae_dtype") or dtype


def load_component(folder: Path, sub: str, cls, *, dtype, trust_pickle: bool, family_label: str):
    """One weighted component of a diffusers folder (unet, vae, text_encoder, text_encoder_2)."""
    check_weights_present(folder / sub, trust_pickle, family_label)
    safe_only = None if trust_pickle else True  # None: prefer safetensors, fall back to .bin (weights_only)
    dtype_key = "dtype" if cls.__module__.startswith("transformers") else "torch_dtype"  # transformers 5 says dtype
    return guarded(folder / sub, lambda: cls.from_pretrained(folder, subfolder=sub, local_files_only=True,
                                                             use_safetensors=safe_only, **{dtype_key: dtype}))


def check_weights_present(sub: Path, trust_pickle: bool, family_label: str) -> None:
    if not sub.is_dir():
        raise ModelLoadError(f"{sub} is missing; a {family_label} folder needs every component folder its "
                             f"model_index.json names: copy the complete model folder")
    has_safetensors = any(sub.glob("*.safetensors"))
    if not has_safetensors and any(sub.glob("*.bin")) and not trust_pickle:
        raise ModelLoadError(pickle_refused_message(sub))


def guarded(where: Path, load):
    try:
        return load()
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise ModelLoadError(f"could not load {where} ({type(err).__name__}: {first_line(err)}); a file there is "
                             f"probably missing, truncated or corrupt: copy the complete model folder again") from err


def refuse_inpainting(in_channels: int | None, where, family_label: str) -> None:
    if in_channels not in (None, 4):
        raise ModelLoadError(f"{where}: its UNet takes {in_channels} input channels (an inpainting or other "
                             f"special model); loradesk trains regular text-to-image {family_label} models "
                             f"(4 channels)")


def tokenizer(folder: Path, sub: str, pad_token: str):
    """A CLIP tokenizer: the folder's own when it has one, else OpenAI's BPE shipped with loradesk, padded with
    `pad_token` ("<|endoftext|>" for CLIP ViT-L, "!" for the OpenCLIP encoders of SD 2.x and SDXL)."""
    from transformers import CLIPTokenizer
    if any((folder / sub / name).is_file() for name in ("tokenizer_config.json", "vocab.json", "tokenizer.json")):
        return guarded(folder / sub, lambda: CLIPTokenizer.from_pretrained(folder, subfolder=sub,
                                                                          local_files_only=True))
    return CLIPTokenizer(str(CLIP_BPE / "vocab.json"), str(CLIP_BPE / "merges.txt"), pad_token=pad_token,
                         model_max_length=77)


def noise_scheduler(folder: Path, overrides: dict | None = None):
    """The training (DDPM) schedule from the folder's scheduler config, with `overrides` (prediction_type, ...)."""
    from diffusers import DDPMScheduler
    config = guarded(folder / "scheduler", lambda: DDPMScheduler.load_config(folder, subfolder="scheduler",
                                                                            local_files_only=True))
    return training_scheduler({**config, **(overrides or {})})


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__


class Fit:
    """Fits converted weights into models built from configs, with errors that name the file and the fix.

    diffusers' converters rename the keys; we build each model on the meta device and assign the tensors with a
    strict load ourselves because `from_single_file` leaves missing weights on the meta device and only warns
    about unexpected ones, while checking the converted dict lets us name every key and shape that does not fit.
    """

    def __init__(self, source: Path, config_dir: Path, default_configs: bool, family_label: str):
        self.source, self.config_dir, self.default_configs = source, config_dir, default_configs
        self.family_label = family_label
        if default_configs:
            self.fix = (f"if it is not a standard-size {family_label} model, put its diffusers configs (a model "
                        f"folder without weights) beside it in a folder named '{source.stem}' or "
                        f"'{source.stem}.config', or pass config_dir")
        else:
            self.fix = f"check that {config_dir} holds the configs of this checkpoint"

    def config(self, read, sub: str):
        try:
            return read()
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"{self.config_dir / sub} has no readable config ({first_line(err)}); the config "
                                 f"folder needs model_index.json and a config for every component") from err

    def convert(self, run) -> dict:
        try:
            weights = run()
        except (KeyError, IndexError, AttributeError, TypeError, ValueError) as err:
            raise ModelLoadError(f"{self.source}: its keys could not be converted from the original layout "
                                 f"({type(err).__name__}: {first_line(err)}); {self.fix}") from err
        return {k: v.contiguous() for k, v in weights.items() if v is not None}

    def load(self, model: torch.nn.Module, what: str, weights: dict, dtype: torch.dtype) -> None:
        if not weights:
            raise ModelLoadError(f"{self.source} contains no {what} weights; give a complete checkpoint (UNet, "
                                 f"VAE and text encoders)")
        problems = misfits(model.state_dict(), weights)
        if problems:
            raise ModelLoadError(f"{self.source}: its {what} weights do not fit the configs in {self.config_dir} "
                                 f"({'; '.join(problems)}); {self.fix}")
        # cast here rather than with model.to(dtype): diffusers' .to() warns on every cast
        weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
        model.load_state_dict(weights, strict=True, assign=True)
        model.eval()


def misfits(expected: dict, weights: dict) -> list[str]:
    """Counts of shape mismatches, missing and unexpected keys, each with its first two examples."""
    shapes = [f"{k} is {tuple(weights[k].shape)} but the config wants {tuple(v.shape)}"
              for k, v in expected.items() if k in weights and weights[k].shape != v.shape]
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    problems = []
    for label, items in (("shape mismatches", shapes), ("missing keys", missing), ("unexpected keys", unexpected)):
        if items:
            problems.append(f"{len(items)} {label}, e.g. {', '.join(items[:2])}")
    return problems


def clip_keys(weights: dict, text_encoder) -> dict:
    """Converted CLIP keys as the installed transformers names them."""
    if not hasattr(text_encoder, "text_model"):  # transformers >= 5 dropped the `text_model.` level
        weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
    # old checkpoints store CLIP's position_ids buffer, which transformers now rebuilds instead of loading
    return {k: v for k, v in weights.items() if not k.endswith("position_ids")}


def empty_models(builders: dict):
    """Models built on the meta device from configs (no memory for weights until they are assigned)."""
    from accelerate import init_empty_weights
    with init_empty_weights():
        return {name: build() for name, build in builders.items()}
