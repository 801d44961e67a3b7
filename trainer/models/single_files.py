"""The parts of a transformer family's single files (SD3, FLUX): the VAE and text encoders a checkpoint may hold under
a prefix, or that people keep as separate files (ComfyUI's clip_l / clip_g / t5xxl / ae files, named by model.*_path).
Each part is built from the configs on the meta device and gets its weights through a strict load (loading.Fit),
after a check of what the file is (a CLIP-G given as CLIP-L, an SDXL VAE), which validate makes from the headers
alone (part_problems), so Check and loading say the same."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelLoadError
from .loading import Fit, clip_keys, empty_models, vae_dtype

# one weight each kind has, named as its own file holds it (a CLIP also with transformers' `text_model.`)
PROBES = {"vae": "decoder.conv_in.weight", "clip": "encoder.layers.0.self_attn.q_proj.weight",
          "t5": "encoder.block.0.layer.0.SelfAttention.q.weight"}


class FromSingleFiles:
    """load_single_file and shipped_configs for a transformer family (SD3, FLUX) whose single files a module of
    its own reads (its load_models and shipped_configs, which _files returns); the family gives components()."""

    def _files(self):
        raise NotImplementedError

    def load_single_file(self, state_dict: dict, *, source: Path, config_dir: Path | None, dtype,
                         prediction: str | None = None, options: dict | None = None) -> dict:
        models, configs = self._files().load_models(state_dict, source=source, config_dir=config_dir, dtype=dtype,
                                                    options=options or {}, label=self.label)
        return self.components(models, configs)

    def shipped_configs(self, state_dict: dict, prediction: str | None) -> Path:
        return self._files().shipped_configs(state_dict)


@dataclass(frozen=True)
class Part:
    sub: str                 # the diffusers component: vae, text_encoder, text_encoder_2, ...
    option: str              # model.<option> names its separate file
    label: str               # CLIP-L, T5-XXL, VAE
    prefixes: tuple          # where a whole single file keeps it
    kind: str                # vae, clip (CLIPTextModel), clip_projected (with its projection), clip_unprojected
    #                          (a projection that is an identity: SD3's CLIP-L pools unprojected), t5
    file: str                # the file people have, for messages
    optional: bool = False   # a model that runs without it (SD3 without T5)

    @property
    def probe(self) -> str:
        return PROBES[self.kind.split("_")[0]]


def missing_message(source: Path, part: Part) -> str:
    return (f"{source} holds no {part.label}; give its file as model.{part.option} ({part.file}, as ComfyUI keeps "
            f"it beside the checkpoint)")


def component_problem(part: Part, shapes: dict, configs: Path, where) -> str | None:
    """Why weights of these shapes (names without the single file's prefix) are not `part` as `configs` describe
    it, or None."""
    shape = shapes.get(part.probe, shapes.get("text_model." + part.probe))
    give = f"give {part.file} as model.{part.option}"
    if shape is None or len(shape) < 2:
        what = "file" if part.kind == "vae" else "text encoder"
        return f"{where} is not a {part.label} {what} (it has no {part.probe}); {give}"
    config = json.loads((configs / part.sub / "config.json").read_text(encoding="utf-8"))
    want = config.get("latent_channels") if part.kind == "vae" else config.get("hidden_size", config.get("d_model"))
    if want is not None and shape[1] != want:
        what = "latent channels" if part.kind == "vae" else "wide"
        return (f"{where} is not this model's {part.label}: it has {shape[1]} {what} where it needs {want} (an "
                f"SD 1.x/SDXL VAE has 4 channels; CLIP-L is 768 wide, CLIP-G 1280, T5-XXL 4096); {give}")
    return None


def part_problems(parts: tuple[Part, ...], source: Path, shapes: dict, options: dict, configs: Path) -> list[str]:
    """What loading `source` (whose header gave `shapes`) with these options would refuse, from headers only."""
    from .detect import safetensors_shapes
    problems = []
    for part in parts:
        if options.get(part.option):
            path = Path(options[part.option])
            problem = component_problem(part, safetensors_shapes(path), configs, f"model.{part.option} {path}")
        elif part.optional or any(k.startswith(part.prefixes) for k in shapes):
            continue  # inside model.path (converted at load), or a part the model runs without
        else:
            problem = missing_message(source, part)
        problems += [problem] if problem else []
    return problems


def load_parts(parts: tuple[Part, ...], state_dict: dict, *, source: Path, fit: Fit, dtype, options: dict) -> dict:
    """sub -> the part's model with its weights, from its own file or from `state_dict` (the single file)."""
    models = {}
    for part in parts:
        weights, where = part_weights(part, state_dict, options)
        if weights is None and part.optional:
            continue
        if weights is None:
            raise ModelLoadError(missing_message(source, part))
        part_fit = fit
        if where is not None:  # a separate file: the kind of file it is, before its weights are converted
            refuse(component_problem(part, {k: list(v.shape) for k, v in weights.items()}, fit.config_dir,
                                     f"model.{part.option} {where}"))
            part_fit = Fit(where, fit.config_dir, fit.default_configs, fit.family_label)
        build = _vae if part.kind == "vae" else _t5 if part.kind == "t5" else _clip
        models[part.sub] = build(part, weights, part_fit, vae_dtype(options, dtype) if part.kind == "vae" else dtype)
    return models


def part_weights(part: Part, state_dict: dict, options: dict) -> tuple[dict | None, Path | None]:
    """The part's weights without the single file's prefix (from its own file when the option names one), and
    that file (None: inside the single file)."""
    if options.get(part.option):
        path = Path(options[part.option])
        return read(path), path
    prefix = next((p for p in part.prefixes if any(k.startswith(p) for k in state_dict)), None)
    if prefix is None:
        return None, None
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}, None


def _vae(part: Part, weights: dict, fit: Fit, dtype):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    config = fit.config(lambda: AutoencoderKL.load_config(fit.config_dir, subfolder="vae"), "vae")
    model = empty_models({"vae": lambda: AutoencoderKL.from_config(config)})["vae"]
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in weights):
        converted = dict(weights)  # already in diffusers' layout (diffusion_pytorch_model.safetensors)
    else:  # the original (LDM) layout, as BFL's ae.safetensors and SAI's files keep it
        converted = fit.convert(lambda: convert_ldm_vae_checkpoint(weights, config))
    fit.load(model, part.label, converted, dtype)
    return model


def _t5(part: Part, weights: dict, fit: Fit, dtype):
    from transformers import T5Config, T5EncoderModel
    config = fit.config(lambda: T5Config.from_pretrained(fit.config_dir, subfolder=part.sub), part.sub)
    model = empty_models({part.sub: lambda: T5EncoderModel(config)})[part.sub]
    weights = dict(weights)
    if "shared.weight" in weights:  # T5's input embedding is tied: files keep one name or the other
        weights.setdefault("encoder.embed_tokens.weight", weights["shared.weight"])
    elif "encoder.embed_tokens.weight" in weights:
        weights["shared.weight"] = weights["encoder.embed_tokens.weight"]
    fit.load(model, f"{part.label} text encoder", weights, dtype)
    return model


def _clip(part: Part, weights: dict, fit: Fit, dtype):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    config = fit.config(lambda: CLIPTextConfig.from_pretrained(fit.config_dir, subfolder=part.sub), part.sub)
    cls = CLIPTextModel if part.kind == "clip" else CLIPTextModelWithProjection
    model = empty_models({part.sub: lambda: cls(config)})[part.sub]
    weights = {k: v for k, v in clip_keys(dict(weights), model).items() if k != "logit_scale"}
    if part.kind == "clip":
        weights.pop("text_projection.weight", None)  # FLUX pools CLIP-L's pooler output: a projection is unused
    if part.kind == "clip_unprojected":  # SD3 pools CLIP-L unprojected: ComfyUI's SD3 text model asks CLIP-L for
        # its unprojected pooled output and diffusers' single-file reader puts an identity here
        # (single_file_utils.py, 1762-1763), whatever projection a clip_l file brings
        weights["text_projection.weight"] = torch.eye(config.projection_dim, config.hidden_size)
    fit.load(model, f"{part.label} text encoder", weights, dtype)
    return model


def refuse(problem: str | None) -> None:
    if problem:
        raise ModelLoadError(problem)


def read(path: Path) -> dict:
    from .checkpoint import read_state_dict
    return read_state_dict(path, trust_pickle=False)
