"""The model-family seam: everything that differs between SD 1.x, SD 2.x and SDXL, behind one interface.

A `Family` owns its text encoders (an ordered mapping from kohya prefix to module), how captions and image sizes
become the denoiser's conditioning, its LoRA target groups, its kohya names (from the model's modules and the
original checkpoint layout), its native size, prediction type and noise process (noise.py), its metadata values,
its sample pipeline, and loading from a diffusers folder or an original single file and baking back to one.
Nothing outside `trainer/models/` branches on a family name: the loop, the dataset, the formats, the adapter
toolkit and the app ask the base model's family (`BaseModel.family`) instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the families load without torch (the app asks them before any model)
    import torch
    from torch import nn

CONFIGS = Path(__file__).resolve().parent / "configs"

# kohya's module groups for LoRA (names are suffixes of module paths; the same in every family's diffusers models)
UNET_GROUPS = {
    "attention": ["to_q", "to_k", "to_v", "to_out.0"],
    "feed_forward": ["ff.net.0.proj", "ff.net.2"],
    "projections": ["proj_in", "proj_out"],
    # LoCon: the convolutions of ResnetBlock2D, Downsample2D, Upsample2D and conv_in / conv_out, as LyCORIS's
    # kohya.py (4.1.3) lines 255-288 target them (it also takes the resnets' time_emb_proj and the time embedding's
    # linears: list those by name to match it). conv_shortcut is the 1x1 conv of a resnet that changes width, which
    # kohya's and LyCORIS's LoCon adapt too, at the linear rank (kohya.py lines 428-436: 1x1 -> lora_dim).
    "conv": ["conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "conv_in", "conv_out"],
}
TEXT_ENCODER_GROUPS = {
    "attention": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "mlp": ["fc1", "fc2"],
}


@dataclass(frozen=True)
class SizeInfo:
    """What SDXL's micro-conditioning needs of one training image (SDXL paper, section 2.2), in pixels:
    its original size, the top-left corner of the crop in the resized image, and the size trained at."""
    original_hw: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_hw: tuple[int, int]


@dataclass(frozen=True)
class TextEncoderSpec:
    prefix: str       # kohya's: lora_te (SD 1.x/2.x), lora_te1 / lora_te2 (SDXL), lora_te3 (SD3's T5)
    component: str    # diffusers pipeline component: text_encoder, text_encoder_2, text_encoder_3
    label: str        # for people: "CLIP ViT-L", "OpenCLIP bigG", "T5-XXL"
    groups: dict = field(default_factory=lambda: TEXT_ENCODER_GROUPS, compare=False)  # its LoRA target groups
    trains_by_default: bool = True  # network.text_encoders "all" includes it (SD3's T5 only when named: te3)
    kind: str = "clip"  # "clip" or "t5": what its module paths look like (reading a diffusers file's components)


@dataclass(frozen=True)
class FusedName:
    """One module of a file layout that holds several trained modules as one (SD3's qkv in the SAI layout): the
    file's kohya name and the internal kohya names of its parts in the order of its output rows, with each part's
    output rows. A part of one is a plain rename. `swap_halves`: the file's module orders the two halves of its
    rows the other way round (SAI's (shift, scale) where diffusers has (scale, shift)), so its up rows swap."""
    name: str
    parts: tuple[str, ...]
    rows: tuple[int, ...]
    swap_halves: bool = False


class Family:
    """The interface every family implements; see sd1.py, sd2.py and sdxl.py."""

    name = ""                # "sd1", "sd2", "sdxl": model.family in the config
    label = ""               # "Stable Diffusion 1.x"
    text_encoder_specs: tuple[TextEncoderSpec, ...] = ()
    unet_groups = UNET_GROUPS
    original_unet_names = False  # kohya names its UNet modules in the original (SGM) layout, not diffusers'
    # training latents drawn from the VAE's posterior (mean + std x noise, as kohya's and diffusers' SD scripts do);
    # False: its mode (FLUX.2 klein, as diffusers' klein trainer and pipeline encode)
    samples_posterior = True
    # denoiser module paths no target group takes, as regular expressions matched against the whole path (FLUX's
    # final proj_out, klein's double-block to_out ModuleLists)
    excluded_targets: tuple[str, ...] = ()
    sd_scripts_versions: tuple[str, ...] = ()  # ss_base_model_version values sd-scripts writes (prefixes)
    # the denoiser's ModuleLists of blocks, in the order it runs them (precision.offload_blocks): the transformers'
    block_lists: tuple[str, ...] = ()
    denoiser_component = "unet"  # the diffusers component (and config folder) of the denoiser: unet, transformer
    denoiser_label = "UNet"      # for people, in messages and the form
    diffusers_alpha_folded = False  # the diffusers layout writes alpha/rank into up (no config needed to read it)
    # the adapter file layouts and the programs that load each, the default (most readers) first; a family whose
    # adapters no one layout brings to every program (SD3) has its runs write every layout
    layouts = {"kohya": "A1111, ComfyUI, Forge and diffusers", "diffusers": "diffusers and ComfyUI"}
    writes_every_layout = False
    # config values that follow the family (samples and the Generate tab start from them): SD 1.x/2.x/SDXL keep
    # the config's defaults
    sample_defaults: dict = {}

    def blocks(self, denoiser) -> list:
        """The denoiser's blocks in the order it runs them, what block offload moves ([]: none to offload)."""
        return [block for name in self.block_lists for block in getattr(denoiser, name)]

    # ---- telling it apart ----------------------------------------------------------------------------------------
    def claims_folder(self, index: dict, unet_config: dict) -> bool:
        """True for a diffusers folder of this family (its model_index.json and UNet config)."""
        raise NotImplementedError

    def claims_checkpoint(self, keys: set[str]) -> bool:
        """True for an original single-file checkpoint of this family (its key layout)."""
        raise NotImplementedError

    def sample_defaults_of(self, config_folder: Path | None) -> dict:
        """The sample defaults of the model whose configs are in config_folder (a family with variants that sample
        differently, FLUX.1 schnell, tells them apart); config values, torch-free."""
        return dict(self.sample_defaults)

    def claims_metadata(self, metadata: dict) -> bool:
        """True for an adapter whose sd-scripts metadata (ss_base_model_version, modelspec.architecture) names
        this family."""
        version = metadata.get("ss_base_model_version", "")
        return any(version.startswith(v) for v in self.sd_scripts_versions)

    def claims_adapter(self, names: set[str]) -> bool:
        """True for an adapter whose kohya names only this family's models have (checked most specific first)."""
        return False

    def refuse_folder(self, folder: Path) -> None:
        """Raise ModelLoadError for a folder of this family that loradesk does not train (SDXL's refiner), from
        its config files only: validate calls it as loading does (detect.check_folder)."""

    def model_problems(self, cfg, source: Path) -> list[str]:
        """What training cfg on the model at `source` (a local folder or file) would refuse that only this family
        knows, from config files and headers (job.model_problems: validate and the app's Check ask it)."""
        return []

    # ---- loading -------------------------------------------------------------------------------------------------
    def load_folder(self, folder: Path, *, dtype: torch.dtype, trust_pickle: bool,
                    options: dict | None = None) -> dict:
        """BaseModel fields from a diffusers folder."""
        raise NotImplementedError

    def load_single_file(self, state_dict: dict, *, source: Path, config_dir: Path | None, dtype: torch.dtype,
                         prediction: str | None = None, options: dict | None = None) -> dict:
        """BaseModel fields from an original-layout state dict, shaped by configs (shipped ones by default);
        `prediction` is what the file's '<stem>.yaml' says (None without one); `options` the model section's
        family options (SD3's separate text-encoder and VAE files)."""
        raise NotImplementedError

    # ---- conditioning --------------------------------------------------------------------------------------------
    def encode_text(self, base, captions: list[str]) -> dict[str, torch.Tensor]:
        """The text part of the conditioning, one row per caption (what the text cache stores)."""
        raise NotImplementedError

    def conditioning(self, base, text: dict[str, torch.Tensor], sizes: list[SizeInfo]) -> dict[str, torch.Tensor]:
        """Everything the UNet takes besides the noisy latents and timesteps, for a batch."""
        return dict(text)

    def predict(self, base, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        dtype = base.dtype  # read once at load (BaseModel.frozen_dtype), not a walk of the UNet each step
        return base.denoiser(noisy.to(dtype), timesteps, cond["encoder_hidden_states"].to(dtype)).sample

    def noise_process(self, base, cfg):
        """How training and validation noise this family's latents (trainer.models.noise): discrete-time DDPM
        through the model's scheduler, predicting what loss.prediction says ('auto': the scheduler config's).
        A rectified-flow family (SD3, FLUX) returns a FlowNoise(cfg.loss) instead."""
        from .noise import DdpmNoise
        prediction = cfg.loss.prediction if cfg.loss.prediction != "auto" else base.prediction_type()
        return DdpmNoise(base.noise_scheduler, prediction, cfg.loss)

    # ---- names, sizes, metadata, sampling, baking ------------------------------------------------------------------
    def layout(self, choice: str) -> str:
        """The file layout saving.format asks for: "auto" is the one the most programs load."""
        return next(iter(self.layouts)) if choice == "auto" else choice

    def kohya_file_layout(self, index: dict) -> list[FusedName]:
        """How this family's kohya files group the modules of `index` (a module_index) when that is not one file
        module per trained module ([] then: SD 1.x/2.x/SDXL). SD3's fuse q, k and v as sd-scripts does."""
        return []

    def kohya_file_parts(self, names, metadata: dict | None = None) -> list[FusedName]:
        """The fused modules among a kohya file's names (read back into their parts); [] where files fuse none."""
        return []

    def prediction_type(self, base) -> str:
        """What the denoiser predicts: "epsilon" or "v_prediction" as the model's scheduler config says; "flow"
        (rectified flow's velocity) for a FlowMatchEulerDiscreteScheduler, whose config has no prediction_type."""
        return base.noise_scheduler.config.get("prediction_type", "flow")

    def latents(self, base, sampled: torch.Tensor) -> torch.Tensor:
        """VAE latents as the denoiser takes them: (z - shift) * scale, from the VAE's config (SD3's VAE has a
        shift_factor; SD 1.x/2.x/SDXL's have none)."""
        shift = base.vae.config.get("shift_factor", None)
        scaled = sampled if shift is None else sampled - shift
        return scaled * base.vae.config.scaling_factor

    def kohya_unet_path(self, path: str, unet_config) -> str:
        """A UNet module path as kohya names it (the diffusers path for SD 1.x/2.x)."""
        return path

    def diffusers_unet_path(self, kohya_path: str, unet_config) -> str:
        """The inverse of kohya_unet_path."""
        return kohya_path

    def metadata(self, base) -> dict[str, str]:
        """ss_base_model_version, ss_v2, modelspec.architecture and modelspec.implementation as sd-scripts writes."""
        raise NotImplementedError

    def pipeline(self, base, scheduler=None):
        raise NotImplementedError

    def original_checkpoint(self, base) -> dict[str, torch.Tensor]:
        """The model's weights under the original single-file names (A1111, ComfyUI)."""
        raise NotImplementedError

    def model_builders(self, config_dir: Path) -> dict:
        """"denoiser" and each text encoder's kohya prefix -> a function that builds it from config_dir's configs
        (meta.meta_models calls them on the meta device: key sets and names without weights)."""
        raise NotImplementedError

    def meta_config_dir(self, adapter_names: set[str] | None = None, metadata: dict | None = None) -> Path:
        """The shipped configs of this family's standard model (for key sets and name maps without weights)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<family {self.name}>"

    def pipeline_text_kwargs(self, text: dict, negative: dict | None, empty: dict | None = None) -> dict:
        """The pipeline() keyword arguments that stand for a prompt encoded by encode_text (one row), so samples
        render with the text encoders gone (dataset.free_text_encoders). `negative`: the negative prompt's
        encoding, None when there is none; `empty`: the encoding of "" (some pipelines' negative then)."""
        raise NotImplementedError


def size_problems(cfg, multiple: int, why: str, label: str) -> list[str]:
    """Image sides a denoiser with patches needs beyond the VAE's factor of 8 (config.validate checks that one)."""
    out = []
    for key in ("resolution", "bucket_step"):
        value = getattr(cfg.dataset, key)
        if value % multiple:
            out.append(f"dataset.{key} {value} must be a multiple of {multiple} for {label} ({why})")
    return out


def text_encoder_modules(parts: dict, specs: tuple[TextEncoderSpec, ...]) -> dict[str, nn.Module]:
    """prefix -> module, in the family's order."""
    return {spec.prefix: parts[spec.component] for spec in specs}
