"""FLUX.2 klein (4B, 9B; base and step-distilled): a rectified-flow transformer of double- and single-stream blocks
(Black Forest Labs 2026) conditioned on a Qwen3 language model. As diffusers' Flux2KleinPipeline builds its inputs
(diffusers 0.42.1, pipelines/flux2/pipeline_flux2_klein.py):
- text: each caption goes through the tokenizer's chat template as one user message (add_generation_prompt,
  enable_thinking=False), padded to 512 tokens; Qwen3's hidden states of layers 9, 18 and 27 are stacked per token
  into one 3 x width vector (l. 208-263). There is no pooled vector and no guidance embedding;
- latents: the VAE's (32 channels) are patchified 2x2 into 128 channels and normalised by the VAE's BatchNorm
  running statistics (l. 371-398, 471-475, 911-916), then flattened to tokens with (t, h, w, l) position ids
  (l. 287-320); text tokens get (0, 0, 0, l) (l. 267-285);
- timestep: sigma (0..1) as the transformer's input (it multiplies by 1000 itself); the base model samples with
  true CFG against "" (guidance 4, 50 steps), the distilled one without (4 steps).
The loss is taken on VAE-shaped latents: `latents` applies the batch-norm normalisation in patch space and folds
the patches back, `predict` packs and unpacks around the transformer (a permutation, so the loss is the same).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

from typing import TYPE_CHECKING

from .errors import ModelLoadError
from .family import CONFIGS, Family, FusedName, TextEncoderSpec, size_problems, text_encoder_modules
from .loading import load_component, vae_dtype
from .sd3 import flow_scheduler, inference_scheduler

if TYPE_CHECKING:
    import torch

CONFIG_DIR = CONFIGS / "flux2-klein-4b"
TEXT_LENGTH = 512            # Flux2KleinPipeline's max_sequence_length default (l. 635)
TEXT_LAYERS = (9, 18, 27)    # its text_encoder_out_layers default (l. 215, 636)
# diffusers' Flux2Transformer2DModel names (transformer_flux2.py:497-548, 723-790, 876-909). The single blocks fuse
# q, k, v and the MLP input in one Linear (attn.to_qkv_mlp_proj) and read both back through attn.to_out: both are
# "attention" as FLUX.1's single-block q/k/v are. The double blocks' attn.to_out is a ModuleList (to_out.0 is the
# Linear), which the suffix "to_out" must not take (Flux2.excluded_targets).
TRANSFORMER_GROUPS = {
    "attention": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                  "to_qkv_mlp_proj", "to_out"],
    "feed_forward": ["ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out"],
    "modulation": ["double_stream_modulation_img.linear", "double_stream_modulation_txt.linear",
                   "single_stream_modulation.linear"],
}
# Qwen3 decoder layers (transformers models/qwen3/modeling_qwen3.py): self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj
QWEN3_GROUPS = {"attention": ["q_proj", "k_proj", "v_proj", "o_proj"], "mlp": ["gate_proj", "up_proj", "down_proj"]}
ONLY_KLEIN = ("_attn_to_qkv_mlp_proj", "_ff_linear_in", "_ff_context_linear_in")  # module names FLUX.1 lacks


class Flux2(Family):
    name = "flux2"
    label = "FLUX.2 klein"
    # the posterior's mode, as diffusers' train_dreambooth_lora_flux2_klein.py (latent_dist.mode()) and the
    # pipeline (sample_mode="argmax", pipeline_flux2_klein.py:468) encode
    samples_posterior = False
    # "lora_te1": sd-scripts has no klein trainer to follow; klein has one text encoder, and kohya gives a family's
    # first encoder lora_te1 when it has several kinds (SDXL, SD3, FLUX.1); kind "qwen3" keeps text_encoder_prefixes
    # from taking klein's lone text_encoder for SD 1.x's. Not trained by default: Flux2LoraLoaderMixin loads only
    # the transformer (lora_pipeline.py:5860-5893), so no diffusers user could apply a text-encoder LoRA.
    text_encoder_specs = (TextEncoderSpec("lora_te1", "text_encoder", "Qwen3", groups=QWEN3_GROUPS,
                                          trains_by_default=False, kind="qwen3"),)
    unet_groups = TRANSFORMER_GROUPS
    excluded_targets = (r"transformer_blocks\.\d+\.attn\.to_out",)  # ModuleLists (see TRANSFORMER_GROUPS)
    block_lists = ("transformer_blocks", "single_transformer_blocks")  # double-stream, then single
    denoiser_component = "transformer"
    denoiser_label = "transformer"
    diffusers_alpha_folded = True
    # kohya: BFL's checkpoint names, which diffusers' kohya FLUX.2 converter reads and ComfyUI's rule for any model
    # key takes (test_flux2's real-size check); that ComfyUI's klein model keeps BFL's names is assumed (the ComfyUI
    # read here predates klein), and no file was loaded in ComfyUI. diffusers' own layout: diffusers only
    layouts = {"kohya": "diffusers, and ComfyUI by its rule for any key", "diffusers": "diffusers"}
    sample_defaults = {"sampling.steps": 50, "sampling.guidance": 4.0}  # Flux2KleinPipeline's (l. 622-624)
    distilled_sample_defaults = {"sampling.steps": 4, "sampling.guidance": 1.0}  # step-distilled: no CFG

    # ---- telling it apart ----------------------------------------------------------------------------------------
    def claims_folder(self, index: dict, unet_config: dict) -> bool:
        """klein's folders, and FLUX.2's other pipelines (dev), which refuse_folder then names: SD 1.x's claim, the
        last resort, would otherwise take them and fail on their files."""
        return str(index.get("_class_name", "")).startswith("Flux2")

    def refuse_folder(self, folder: Path) -> None:
        try:
            name = json.loads((folder / "model_index.json").read_text(encoding="utf-8")).get("_class_name", "")
        except (OSError, ValueError, AttributeError):
            return
        if name != "Flux2KleinPipeline":
            raise ModelLoadError(f"{folder} holds a {name} (FLUX.2 [dev] or another FLUX.2 pipeline); loradesk trains "
                                 f"{self.label} (Flux2KleinPipeline folders) only")

    def claims_checkpoint(self, keys: set[str]) -> bool:
        # klein's BFL keys (double_blocks., single_blocks.) are FLUX.1's; only the shared modulation tells them
        # apart. Single files are not loaded yet (load_single_file), so claiming one only sharpens the refusal.
        return any(k.split("diffusion_model.")[-1].startswith("double_stream_modulation_img.") for k in keys)

    def claims_metadata(self, metadata: dict) -> bool:
        return metadata.get("modelspec.architecture", "").startswith("flux-2-klein") or \
            metadata.get("ss_base_model_version", "").startswith("flux2_klein")

    def claims_adapter(self, names: set[str]) -> bool:
        """Names only klein's diffusers model has (in loradesk's plain names or OneTrainer-style lora_transformer_).
        A BFL-named file (lora_unet_double_blocks_...) has FLUX.1's names: without metadata it reads as FLUX.1."""
        return any(n.startswith(("lora_unet_", "lora_transformer_")) and n.endswith(ONLY_KLEIN) for n in names)

    def sample_defaults_of(self, config_folder: Path | None) -> dict:
        """The base model's, or the distilled one's (model_index.json is_distilled); torch-free."""
        return dict(self.distilled_sample_defaults if is_distilled(config_folder) else self.sample_defaults)

    def model_problems(self, cfg, source: Path) -> list[str]:
        problems = size_problems(cfg, 16, "the VAE's factor 8 times the 2x2 patches", self.label)
        if source.is_file():
            problems.append(f"{source.name}: {self.label} loads from a diffusers folder only for now")
        return problems

    # ---- loading -------------------------------------------------------------------------------------------------
    def load_folder(self, folder: Path, *, dtype: torch.dtype, trust_pickle: bool,
                    options: dict | None = None) -> dict:
        from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
        from transformers import Qwen3ForCausalLM
        load = dict(dtype=dtype, trust_pickle=trust_pickle, family_label=self.label)
        models = {"transformer": load_component(folder, "transformer", Flux2Transformer2DModel, **load),
                  "vae": load_component(folder, "vae", AutoencoderKLFlux2,
                                        **dict(load, dtype=vae_dtype(options, dtype))),
                  "text_encoder": load_component(folder, "text_encoder", Qwen3ForCausalLM, **load)}
        return self.components(models, folder)

    def load_single_file(self, state_dict: dict, *, source: Path, config_dir: Path | None, dtype: torch.dtype,
                         prediction: str | None = None, options: dict | None = None) -> dict:
        raise ModelLoadError(f"{self.label} loads from a diffusers folder only for now; give the model's folder "
                             f"(model_index.json, transformer/, vae/, text_encoder/, tokenizer/) instead of "
                             f"{source.name}")

    def components(self, models: dict, config_dir: Path) -> dict:
        from transformers import AutoTokenizer
        from .loading import guarded
        tok = guarded(config_dir / "tokenizer", lambda: AutoTokenizer.from_pretrained(
            config_dir, subfolder="tokenizer", local_files_only=True))
        return {"denoiser": models["transformer"], "vae": models["vae"].eval(), "text_encoder": models["text_encoder"],
                "tokenizer": tok, "tokenizers": {"lora_te1": tok}, "noise_scheduler": flow_scheduler(config_dir),
                "text_encoders": text_encoder_modules(models, self.text_encoder_specs)}

    # ---- conditioning --------------------------------------------------------------------------------------------
    def encode_text(self, base, captions: list[str]) -> dict[str, torch.Tensor]:
        """Flux2KleinPipeline._get_qwen3_prompt_embeds (l. 208-263), through the decoder without its LM head (the
        same hidden states, without a 512 x vocabulary logits tensor per caption)."""
        import torch
        te, tok = base.text_encoders["lora_te1"], base.tokenizers["lora_te1"]
        texts = [tok.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True,
                                         enable_thinking=False) for c in captions]
        enc = tok(texts, return_tensors="pt", padding="max_length", truncation=True, max_length=TEXT_LENGTH)
        decoder = getattr(te, "model", te)
        device = next(te.parameters()).device
        out = decoder(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                      output_hidden_states=True, use_cache=False)
        states = torch.stack([out.hidden_states[k] for k in TEXT_LAYERS], dim=1)  # (b, layers, tokens, width)
        b, n, length, width = states.shape
        return {"encoder_hidden_states": states.permute(0, 2, 1, 3).reshape(b, length, n * width)}

    def latents(self, base, sampled: torch.Tensor) -> torch.Tensor:
        """The VAE's latents normalised as the pipeline does, by its BatchNorm running statistics over the 2x2
        patches' channels, folded back to the VAE's shape."""
        mean, std = bn_statistics(base.vae, sampled)
        return unpatchify((patchify(sampled) - mean) / std)

    def predict(self, base, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        """Patchified and packed in, unpacked out (pipeline l. 371-398, 851-862)."""
        dtype, (b, c, h, w) = base.dtype, noisy.shape
        tokens = patchify(noisy).reshape(b, 4 * c, h * w // 4).permute(0, 2, 1)
        text = cond["encoder_hidden_states"].to(dtype)
        out = base.denoiser(hidden_states=tokens.to(dtype), timestep=(timesteps / 1000).to(dtype), guidance=None,
                            encoder_hidden_states=text, txt_ids=text_ids(text.shape[1], noisy.device),
                            img_ids=image_ids(h // 2, w // 2, noisy.device), return_dict=False)[0]
        return unpatchify(out.permute(0, 2, 1).reshape(b, 4 * c, h // 2, w // 2))

    def noise_process(self, base, cfg):
        """Rectified flow as FLUX.1's: loss.flow_shift, or with loss.resolution_shift the scheduler config's shift
        by token count (klein's pipeline samples with its own empirical mu, compute_empirical_mu l. 63-78)."""
        from .noise import token_shift
        return token_shift(cfg.loss, base.noise_scheduler.config, patch=2)


    # ---- names, metadata, sampling -------------------------------------------------------------------------------
    def kohya_file_layout(self, index: dict) -> list[FusedName]:
        from .flux2_layout import kohya_file_layout
        return kohya_file_layout(index)

    def kohya_file_parts(self, names, metadata: dict | None = None) -> list[FusedName]:
        from .flux2_layout import file_parts
        return file_parts(names)

    def metadata(self, base) -> dict[str, str]:
        """No trainer we know writes klein metadata (sd-scripts has no klein): SAI's pattern (flux-1-dev/lora) with
        the size from the transformer's width (3072: 4B, 4096: 9B); ss_base_model_version is loradesk's own."""
        config = base.denoiser.config
        size = {3072: "-4b", 4096: "-9b"}.get(config.num_attention_heads * config.attention_head_dim, "")
        return {"ss_base_model_version": "flux2_klein", "ss_v2": "False",
                "modelspec.architecture": f"flux-2-klein{size}/lora",
                "modelspec.implementation": "https://github.com/black-forest-labs/flux2"}

    def pipeline(self, base, scheduler=None):
        pipe = klein_pipeline()(
            scheduler=inference_scheduler(scheduler, base.noise_scheduler.config), vae=base.vae,
            text_encoder=base.text_encoders["lora_te1"], tokenizer=base.tokenizers.get("lora_te1"),
            transformer=base.denoiser, is_distilled=is_distilled(Path(base.source)))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def original_checkpoint(self, base) -> dict[str, torch.Tensor]:
        raise ModelLoadError(f"{self.label} loads from and bakes to a diffusers folder only for now")

    def model_builders(self, config_dir: Path) -> dict:
        import functools
        from diffusers import Flux2Transformer2DModel
        from transformers import Qwen3Config, Qwen3ForCausalLM
        config = Flux2Transformer2DModel.load_config(config_dir, subfolder="transformer")
        return {"denoiser": lambda: Flux2Transformer2DModel.from_config(config),
                "lora_te1": functools.partial(Qwen3ForCausalLM,
                                              Qwen3Config.from_pretrained(config_dir, subfolder="text_encoder"))}

    def meta_config_dir(self, adapter_names: set[str] | None = None, metadata: dict | None = None) -> Path:
        return CONFIG_DIR

    def pipeline_text_kwargs(self, text: dict, negative: dict | None, empty: dict | None = None) -> dict:
        """Flux2KleinPipeline's prompt_embeds, and negative_prompt_embeds for its CFG (it encodes "" without them,
        l. 749-760, which needs the text encoder)."""
        out = {"prompt_embeds": text["encoder_hidden_states"]}
        negative = negative if negative is not None else empty
        if negative is not None:
            out["negative_prompt_embeds"] = negative["encoder_hidden_states"]
        return out


def is_distilled(folder: Path | None) -> bool:
    """model_index.json's is_distilled (the step-distilled klein samples without CFG); False when unreadable."""
    try:
        return bool(json.loads((folder / "model_index.json").read_text(encoding="utf-8")).get("is_distilled"))
    except (OSError, ValueError, TypeError, AttributeError):
        return False


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """(b, c, h, w) -> (b, 4c, h/2, w/2), each 2x2 patch's values as channels (Flux2KleinPipeline._patchify_latents)."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unpatchify(latents: torch.Tensor) -> torch.Tensor:
    """The inverse of patchify (Flux2KleinPipeline._unpatchify_latents)."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, h * 2, w * 2)


def bn_statistics(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's BatchNorm running mean and std (sqrt(var + eps)) over patch channels, shaped to broadcast."""
    import torch
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
    return mean, std


def image_ids(h: int, w: int, device) -> torch.Tensor:
    """(t, h, w, l) = (0, row, column, 0) per packed token, row-major (Flux2KleinPipeline._prepare_latent_ids)."""
    import torch
    return torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1)).to(device)


def text_ids(length: int, device) -> torch.Tensor:
    """(0, 0, 0, token) per text token (Flux2KleinPipeline._prepare_text_ids)."""
    import torch
    return torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(length)).to(device)


@functools.cache
def klein_pipeline():
    """Flux2KleinPipeline taking a negative_prompt as the other pipelines do (loradesk's samples and Generate tab
    pass one): encoded like the prompt and given as negative_prompt_embeds, which the pipeline's CFG uses instead
    of "" (l. 749-760). An empty one changes nothing."""
    from diffusers import Flux2KleinPipeline

    class Pipeline(Flux2KleinPipeline):
        def __call__(self, *args, negative_prompt=None, **kwargs):
            negatives = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt or [])
            if any(negatives) and kwargs.get("negative_prompt_embeds") is None:
                prompt = kwargs.get("prompt")
                if len(negatives) == 1 and isinstance(prompt, list):
                    negatives = negatives * len(prompt)
                kwargs["negative_prompt_embeds"] = self.encode_prompt(
                    negatives, device=self._execution_device,
                    max_sequence_length=kwargs.get("max_sequence_length", TEXT_LENGTH))[0]
            return super().__call__(*args, **kwargs)

    Pipeline.__name__ = Pipeline.__qualname__ = "Flux2KleinPipeline"
    return Pipeline


FLUX2_FAMILY = Flux2()
