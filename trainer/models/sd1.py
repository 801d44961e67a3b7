"""Stable Diffusion 1.x: loading (diffusers folder or original single file), text conditioning, sampling.

A family module provides: FAMILY, DEFAULT_CONFIG_DIR, load_folder(), load_single_file(), tokenize(),
encode_text(), pipeline(). `trainer.models` picks the module from the model's family and calls only these.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import ModelLoadError
from .checkpoint import pickle_refused_message
from .info import SD15_CONFIG_DIR
from .schedulers import inference_scheduler, training_scheduler

FAMILY = "sd1"
DEFAULT_CONFIG_DIR = SD15_CONFIG_DIR
TEXT_ENCODER_PREFIX = "lora_te"  # kohya's prefix for SD1's one text encoder
WEIGHTED = ("unet", "vae", "text_encoder")


# --- a diffusers folder -------------------------------------------------------------------------------------------

def load_folder(folder: Path, *, dtype: torch.dtype, trust_pickle: bool) -> dict:
    """The components of a diffusers StableDiffusionPipeline folder, loaded one by one (no safety checker)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    for sub in WEIGHTED:
        _check_weights_present(folder / sub, trust_pickle)
    safe_only = None if trust_pickle else True  # None: prefer safetensors, fall back to .bin (weights_only)
    unet = _load(folder / "unet", lambda: UNet2DConditionModel.from_pretrained(
        folder, subfolder="unet", torch_dtype=dtype, local_files_only=True, use_safetensors=safe_only))
    _refuse_inpainting(unet.config.in_channels, folder / "unet")
    vae = _load(folder / "vae", lambda: AutoencoderKL.from_pretrained(
        folder, subfolder="vae", torch_dtype=dtype, local_files_only=True, use_safetensors=safe_only))
    text_encoder = _load(folder / "text_encoder", lambda: CLIPTextModel.from_pretrained(
        folder, subfolder="text_encoder", dtype=dtype, local_files_only=True, use_safetensors=safe_only))
    return _components(unet, vae, text_encoder, folder)


def _check_weights_present(sub: Path, trust_pickle: bool) -> None:
    if not sub.is_dir():
        raise ModelLoadError(f"{sub} is missing; a Stable Diffusion 1.x folder needs unet/, vae/, text_encoder/, "
                             f"tokenizer/ and scheduler/: copy the complete model folder")
    has_safetensors = any(sub.glob("*.safetensors"))
    if not has_safetensors and any(sub.glob("*.bin")) and not trust_pickle:
        raise ModelLoadError(pickle_refused_message(sub))


def _load(where: Path, load):
    try:
        return load()
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise ModelLoadError(f"could not load {where} ({type(err).__name__}: {_first_line(err)}); a file there is "
                             f"probably missing, truncated or corrupt: copy the complete model folder again") from err


# --- an original-layout single file (CompVis / A1111 / ComfyUI) ---------------------------------------------------

def load_single_file(state_dict: dict, *, source: Path, config_dir: Path | None, dtype: torch.dtype) -> dict:
    """UNet, VAE and CLIP text encoder from one original-layout state dict, shaped by local diffusers configs.

    diffusers' converters rename the keys; we build each model on the meta device and assign the tensors with a
    strict load ourselves because `from_single_file` leaves missing weights on the meta device and only warns
    about unexpected ones, while checking the converted dict lets us name every key and shape that does not fit.
    """
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = config_dir or DEFAULT_CONFIG_DIR
    fit = _Fit(source, configs, default_configs=config_dir is None)
    _refuse_inpainting(_unet_in_channels(state_dict), source)
    unet_config = fit.config(lambda: UNet2DConditionModel.load_config(configs, subfolder="unet"), "unet")
    vae_config = fit.config(lambda: AutoencoderKL.load_config(configs, subfolder="vae"), "vae")
    te_config = fit.config(lambda: CLIPTextConfig.from_pretrained(configs, subfolder="text_encoder"), "text_encoder")
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
        text_encoder = CLIPTextModel(te_config)
    fit.load(unet, "UNet", fit.convert(lambda: convert_ldm_unet_checkpoint(state_dict, unet_config)), dtype)
    fit.load(vae, "VAE", fit.convert(lambda: convert_ldm_vae_checkpoint(state_dict, vae_config)), dtype)
    te_weights = _clip_keys(fit.convert(lambda: convert_ldm_clip_checkpoint(state_dict)), text_encoder)
    fit.load(text_encoder, "text encoder", te_weights, dtype)
    return _components(unet, vae, text_encoder, configs)


def _unet_in_channels(state_dict: dict) -> int | None:
    conv_in = state_dict.get("model.diffusion_model.input_blocks.0.0.weight")
    return None if conv_in is None else conv_in.shape[1]


def _clip_keys(weights: dict, text_encoder) -> dict:
    """Converted CLIP keys as the installed transformers names them."""
    if not hasattr(text_encoder, "text_model"):  # transformers >= 5 dropped the `text_model.` level
        weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
    # old checkpoints store CLIP's position_ids buffer, which transformers now rebuilds instead of loading
    return {k: v for k, v in weights.items() if not k.endswith("position_ids")}


class _Fit:
    """Fits converted weights into models built from configs, with errors that name the file and the fix."""

    def __init__(self, source: Path, config_dir: Path, default_configs: bool):
        self.source, self.config_dir = source, config_dir
        if default_configs:
            self.fix = (f"if it is not an SD1.5-size model, put its diffusers configs (a model folder without "
                        f"weights) beside it in a folder named '{source.stem}' or '{source.stem}.config', or pass "
                        f"config_dir")
        else:
            self.fix = f"check that {config_dir} holds the configs of this checkpoint"

    def config(self, read, sub: str):
        try:
            return read()
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"{self.config_dir / sub} has no readable config ({_first_line(err)}); the config "
                                 f"folder needs model_index.json and unet/, vae/, text_encoder/, tokenizer/, "
                                 f"scheduler/ configs") from err

    def convert(self, run) -> dict:
        try:
            weights = run()
        except (KeyError, IndexError, AttributeError, TypeError, ValueError) as err:
            raise ModelLoadError(f"{self.source}: its keys could not be converted from the original layout "
                                 f"({type(err).__name__}: {_first_line(err)}); {self.fix}") from err
        return {k: v.contiguous() for k, v in weights.items() if v is not None}

    def load(self, model: torch.nn.Module, what: str, weights: dict, dtype: torch.dtype) -> None:
        if not weights:
            raise ModelLoadError(f"{self.source} contains no {what} weights; give a complete Stable Diffusion "
                                 f"checkpoint (UNet, VAE and text encoder)")
        problems = _misfits(model.state_dict(), weights)
        if problems:
            raise ModelLoadError(f"{self.source}: its {what} weights do not fit the configs in {self.config_dir} "
                                 f"({'; '.join(problems)}); {self.fix}")
        # cast here rather than with model.to(dtype): diffusers' .to() warns on every cast
        weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
        model.load_state_dict(weights, strict=True, assign=True)
        model.eval()


def _misfits(expected: dict, weights: dict) -> list[str]:
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


# --- shared -------------------------------------------------------------------------------------------------------

def _refuse_inpainting(in_channels: int | None, where: Path) -> None:
    if in_channels not in (None, 4):
        raise ModelLoadError(f"{where}: its UNet takes {in_channels} input channels (an inpainting or other "
                             f"special model); loradesk trains regular text-to-image SD 1.x models (4 channels)")


def _components(unet, vae, text_encoder, config_dir: Path) -> dict:
    """The BaseModel fields, with tokenizer and training scheduler read from `config_dir`."""
    from diffusers import DDPMScheduler
    from transformers import CLIPTokenizer

    tokenizer = _load(config_dir / "tokenizer", lambda: CLIPTokenizer.from_pretrained(
        config_dir, subfolder="tokenizer", local_files_only=True))
    scheduler_config = _load(config_dir / "scheduler", lambda: DDPMScheduler.load_config(
        config_dir, subfolder="scheduler", local_files_only=True))
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "noise_scheduler": training_scheduler(scheduler_config),
            "text_encoders": {TEXT_ENCODER_PREFIX: text_encoder}}


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__


# --- conditioning and sampling ------------------------------------------------------------------------------------

def tokenize(base, captions) -> torch.LongTensor:
    """Ids padded to model_max_length (77) and truncated to it: SD1 always conditions on 77 positions."""
    captions = [captions] if isinstance(captions, str) else list(captions)
    tok = base.tokenizer
    return tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


def encode_text(base, input_ids: torch.LongTensor) -> torch.Tensor:
    """CLIP's last hidden state, without an attention mask, as SD1 was trained."""
    text_encoder = base.text_encoder
    return text_encoder(input_ids.to(text_encoder.device)).last_hidden_state


def predict(base, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: torch.Tensor) -> torch.Tensor:
    """SD 1.x conditions the UNet on the text encoder's last hidden state alone."""
    dtype = base.unet.dtype
    return base.unet(noisy_latents.to(dtype), timesteps, conditioning.to(dtype)).sample


def pipeline(base, scheduler=None):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
        scheduler=inference_scheduler(scheduler, base.noise_scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
