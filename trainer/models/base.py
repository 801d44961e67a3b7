"""The loaded base model. What differs between families is the `family` object's (see family.py): the model only
holds the frozen components and asks it, so the loop, the exporter and the toolkit stay family-free."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .family import Family, SizeInfo
from .offload import BlockOffload, move_except, offloaded_blocks


@dataclass
class BaseModel:
    family: Family
    denoiser: torch.nn.Module  # the family's denoiser: diffusers UNet2DConditionModel for SD 1.x/2.x/SDXL
    vae: torch.nn.Module  # diffusers AutoencoderKL
    text_encoder: torch.nn.Module  # the first text encoder (transformers CLIPTextModel)
    tokenizer: object  # its tokenizer
    noise_scheduler: object  # diffusers DDPMScheduler, built from the model's scheduler config
    source: str  # the resolved path or hub id
    text_encoders: dict[str, torch.nn.Module] = field(default_factory=dict)  # kohya prefix -> module, in order
    tokenizers: dict[str, object] = field(default_factory=dict)  # kohya prefix -> tokenizer
    options: dict = field(default_factory=dict)  # the family's model options (SD3's t5_length), from model.*
    # the frozen weights' dtypes, read once (frozen_dtype): not a constructor argument, so dataclasses.replace
    # (the loop's data-parallel view) reads them again from its own modules
    _dtypes: dict[str, torch.dtype] = field(default_factory=dict, init=False, repr=False, compare=False)
    offload: BlockOffload | None = field(default=None, init=False, repr=False, compare=False)  # place() sets it

    # ---- conditioning --------------------------------------------------------------------------------------------
    def encode_text(self, captions: list[str] | str) -> dict[str, torch.Tensor]:
        """The text conditioning of each caption (gradients flow where a text encoder trains)."""
        return self.family.encode_text(self, [captions] if isinstance(captions, str) else list(captions))

    def conditioning(self, text: dict[str, torch.Tensor], sizes: list[SizeInfo]) -> dict[str, torch.Tensor]:
        """What the denoiser takes for a batch: the text conditioning plus, for SDXL, the size and crop ids."""
        return self.family.conditioning(self, text, sizes)

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: dict) -> torch.Tensor:
        """The denoiser's prediction for noisy latents under `conditioning` (what conditioning() returned)."""
        return self.family.predict(self, noisy_latents, timesteps, conditioning)

    def pipeline(self, scheduler=None):
        """An inference pipeline sharing these very modules (no copy), no safety checker, progress bar off.

        `scheduler`: None (DPM-Solver++ from the model's scheduler config), a name ("dpmsolver", "ddim",
        "euler", "euler_a") or a diffusers scheduler instance.
        """
        return self.family.pipeline(self, scheduler)

    # ---- facts ---------------------------------------------------------------------------------------------------
    def kohya_unet_path(self, path: str) -> str:
        """A UNet module path as kohya names it in this family's files."""
        return self.family.kohya_unet_path(path, self.denoiser.config)

    def module_index(self):
        """kohya name -> (prefix, module path, layer) of every adaptable layer (trainer.formats.module_index)."""
        from trainer.formats import module_index
        return module_index(self.denoiser, self.text_encoders, self.kohya_unet_path)

    def injected_adapter(self):
        """The LoRA injected into this model (trainer.network), as an Adapter keyed by this family's kohya names."""
        from trainer.formats import adapter_from_model
        return adapter_from_model(self.denoiser, self.text_encoders, unet_path=self.kohya_unet_path)

    def metadata(self) -> dict[str, str]:
        """The family's ss_*/modelspec values for adapters trained on this model."""
        return self.family.metadata(self)

    @property
    def native_resolution(self) -> int:
        """The image side the model was trained at (512 for SD 1.5, 1024 for SDXL, the tiny model's own)."""
        from .info import native_size
        return native_size(self.denoiser.config, self.vae.config)

    def prediction_type(self) -> str:
        """"epsilon" or "v_prediction", as the model's scheduler config says; "flow" for rectified flow."""
        return self.family.prediction_type(self)

    def latents(self, sampled: torch.Tensor) -> torch.Tensor:
        """Latents drawn from the VAE's posterior, scaled (and shifted) as the denoiser takes them."""
        return self.family.latents(self, sampled)

    @property
    def components(self) -> list[torch.nn.Module]:
        return [self.denoiser, self.vae, *self.text_encoders.values()]

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    @property
    def dtype(self) -> torch.dtype:
        return self.frozen_dtype("denoiser")

    @property
    def vae_dtype(self) -> torch.dtype:
        """What the VAE's input is cast to (fp32 where the VAE says force_upcast, whatever the UNet's)."""
        return self.frozen_dtype("vae")

    def frozen_dtype(self, component: str) -> torch.dtype:
        """The dtype of a frozen component's weights ("denoiser", "vae"), read once: diffusers' ModelMixin.dtype walks
        every submodule on each read (3% of a CPU training step, where the UNet and the VAE read it), and frozen
        weights keep their dtype from load on. Whoever casts them afterwards says so with place()."""
        if component not in self._dtypes:
            self._dtypes[component] = getattr(self, component).dtype
        return self._dtypes[component]

    def store_denoiser_in_fp8(self, compute_dtype: torch.dtype) -> None:
        """The denoiser's frozen weights in fp8 (store_in_fp8); its dtype reads as compute_dtype from then on."""
        store_in_fp8(self.denoiser, compute_dtype)
        self._dtypes.clear()

    def place(self, device, dtype: torch.dtype, fp8_denoiser: bool = False, keep: tuple = (),
              offload_blocks: int = 0) -> None:
        """Every frozen component to `device`, in `dtype` (a VAE that overflows in half precision, as SDXL's does,
        says force_upcast and stays fp32; with fp8_denoiser the denoiser stored in fp8, store_denoiser_in_fp8);
        the dtypes are read again once. Each is cast before it moves: the card never holds a full-precision copy
        (SD 3.5 Large's transformer is 32 GB in fp32, FLUX.1's 48 GB). `offload_blocks`: the frozen weights of the
        denoiser's last N blocks stay in CPU memory, each block's brought in as it runs (offload.BlockOffload)."""
        for module in self.components:
            keep_fp32 = module is self.vae and self.vae.config.get("force_upcast", False)
            if dtype != torch.float32 and not keep_fp32:
                module.to(dtype=dtype)
            if fp8_denoiser and module is self.denoiser:
                self.store_denoiser_in_fp8(dtype)
            if offload_blocks and module is self.denoiser:
                self.offload = BlockOffload(offloaded_blocks(self.family.blocks(module), offload_blocks), device)
            if not any(module is kept for kept in keep):  # `keep`: cast, but left where it is for now
                self.move(module, device)
        self._dtypes.clear()

    def move(self, module: torch.nn.Module, device) -> None:
        """module.to(device), but the denoiser's offloaded blocks stay in CPU memory until they run."""
        move_except(module, device, self.offload if module is self.denoiser else None)


def store_in_fp8(model: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    """diffusers' layerwise casting: a model's Linear and conv weights stored in float8_e4m3fn, each layer cast to
    compute_dtype while it runs; peft's LoRA layers (trainable, fp32), the position and patch embeddings, the outer
    projections and any module the model keeps in fp32 are left as they are. diffusers' enable_layerwise_casting
    would also skip every module whose name holds "norm", which in SD3 and FLUX are the adaLN modulation Linears:
    3.25 B of FLUX.1's 11.9 B parameters left in bf16 (15.1 GB instead of 11.9); sd-scripts' fp8_base casts them,
    and so does this (its hook directly: enable_layerwise_casting adds the class's "norm" pattern to any given)."""
    from diffusers.hooks import apply_layerwise_casting
    from peft.tuners.lora.layer import LoraLayer
    skip = ("pos_embed", "patch_embed", "^proj_in$", "^proj_out$", *LoraLayer.adapter_layer_names,
            *(getattr(model, "_keep_in_fp32_modules", None) or ()))
    apply_layerwise_casting(model, storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype,
                            skip_modules_pattern=skip)
