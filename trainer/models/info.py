"""What the files of a base model tell before any weights load: where it is, its native image size, the training
settings that follow from it. Stdlib only (json), so the app can ask while it builds its first page.
"""
from __future__ import annotations

import json
from pathlib import Path

from trainer.paths import expand_path

SD15_CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "sd15"  # shipped, for single files without configs
SD_DEFAULT_SIZE = 512  # SD 1.x; also what a hub id or an unreadable config is taken to be
# the built-in tiny model trains at its own size in a few minutes on a CPU (the tiny-demo preset: 340 steps, ~100 s)
TINY_MAX_STEPS = 300
# its samples: three sets in a default run, at the guidance the tiny-demo preset samples it with
TINY_SAMPLE_EVERY = 100
TINY_GUIDANCE = 4.0


def resolve_model_path(path: str) -> str:
    """"" -> the tiny built-in model folder; an existing local path -> absolute; anything else unchanged."""
    if not str(path).strip():
        return str(tiny_model_path())
    local = expand_path(path)
    return str(local.resolve()) if local.exists() else str(path)


def tiny_model_path() -> Path:
    return Path(__file__).resolve().parent.parent / "assets" / "tiny-sd"


def is_tiny_model(path: str) -> bool:
    return Path(resolve_model_path(path)) == tiny_model_path()


def sidecar_config_dir(file: Path) -> Path | None:
    """Diffusers configs beside a single-file checkpoint: a '<stem>/' or '<stem>.config/' folder."""
    for folder in (file.with_suffix(""), file.parent / f"{file.stem}.config"):
        if (folder / "model_index.json").is_file():
            return folder
    return None


def native_size(unet_config: dict, vae_config: dict) -> int:
    """The image side the model was trained at: the UNet's latent size times the VAE's downsampling (what
    diffusers' pipelines use when no width or height is given)."""
    # FLUX's transformer config has no sample_size: FluxPipeline's default_sample_size is 128 (1024 px)
    return int(unet_config.get("sample_size", 128)) * 2 ** (len(vae_config["block_out_channels"]) - 1)


def native_resolution(path: str) -> int:
    """The native image side of the model at `path` ("" = the tiny model), read from its config files only."""
    folder = config_folder(resolve_model_path(path))
    if folder is None:
        return SD_DEFAULT_SIZE
    try:
        return native_size(_json(denoiser_config_file(folder)), _json(folder / "vae" / "config.json"))
    except (OSError, ValueError, KeyError, TypeError):
        return SD_DEFAULT_SIZE  # loading the model names the damage; a default size is enough to fill a form


def denoiser_config_file(folder: Path) -> Path:
    """The denoiser's config of a diffusers folder: unet/ (SD 1.x/2.x/SDXL) or transformer/ (SD3, FLUX)."""
    transformer = folder / "transformer" / "config.json"
    return transformer if transformer.is_file() else folder / "unet" / "config.json"


def training_defaults(path: str) -> dict[str, object]:
    """Config values that follow the base model: its native resolution, and for the built-in tiny model a step
    count that finishes in minutes on a CPU and its samples' rhythm and guidance. Generating on the model starts
    from the same values (presets.generation_defaults)."""
    values: dict[str, object] = {"dataset.resolution": native_resolution(path), **family_sample_defaults(path)}
    if is_tiny_model(path):
        values.update({"schedule.max_steps": TINY_MAX_STEPS, "sampling.every_n_steps": TINY_SAMPLE_EVERY,
                       "sampling.guidance": TINY_GUIDANCE})
    return values


def family_sample_defaults(path: str) -> dict[str, object]:
    """The sampling values that follow the model's family (FLUX.1 dev: 28 steps at guidance 3.5; SD 3.5: 28 at 4.5;
    SD 1.x/2.x/SDXL have none); {} when the family cannot be told from its files."""
    name = family_name(path)
    if name is None:
        return {}
    from .detect import get_family
    return get_family(name).sample_defaults_of(config_folder(resolve_model_path(path)))


def config_folder(source: str) -> Path | None:
    """The diffusers configs that describe a model: a folder itself, a single file's sidecar configs, or the
    shipped configs of the family the file's keys show (read from its header, not its weights)."""
    local = Path(source)
    if local.is_dir():
        return local
    if local.is_file():
        return sidecar_config_dir(local) or _shipped_configs(local)
    return None


def _shipped_configs(file: Path) -> Path:
    if file.suffix.lower() != ".safetensors":
        return SD15_CONFIG_DIR  # a pickle is not opened before it is loaded (and trusted)
    try:
        from safetensors import safe_open
        with safe_open(str(file), framework="pt") as f:
            keys = set(f.keys())
            state = {k: None for k in keys} | ({"global_step": f.get_tensor("global_step")}
                                               if "global_step" in keys else {})
        from .detect import family_of_checkpoint
        return family_of_checkpoint(state, file).shipped_configs(state, original_yaml_prediction(file))
    except Exception:  # noqa: BLE001 - a damaged or foreign file: loading it names the damage
        return SD15_CONFIG_DIR


def original_yaml_prediction(file: Path) -> str | None:
    """A1111's convention: a '<stem>.yaml' beside a checkpoint (the original inference config) says v-prediction
    with `parameterization: "v"`, epsilon without it; None when there is no such file."""
    yaml_file = file.with_suffix(".yaml")
    if not yaml_file.is_file():
        return None
    import yaml
    from .errors import ModelLoadError
    try:
        original = yaml.safe_load(yaml_file.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ModelLoadError(f"{yaml_file} is not readable YAML ({err}); fix or remove it") from err
    params = original.get("model", {}).get("params", {}) if isinstance(original, dict) else {}
    return "v_prediction" if params.get("parameterization") == "v" else "epsilon"


def family_name(path: str) -> str | None:
    """The family of the model at path ("" = the tiny one) from its configs or keys: sd1, sd2, sdxl; None when
    it cannot be told without loading it (a hub id, a damaged folder)."""
    from .detect import family_of_folder
    folder = config_folder(resolve_model_path(path))
    try:
        return family_of_folder(folder).name if folder is not None else None
    except Exception:  # noqa: BLE001 - not a readable model folder: loading it names the damage
        return None


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def model_summary(path: str) -> dict | None:
    """What a form shows of a base model before loading it: its family, native size and text encoders
    ({"family", "label", "native", "encoders": [(name, label)]}, names as config keys take them: te, te1, te2);
    None when its files do not tell."""
    from .detect import get_family
    name = family_name(path)
    if name is None:
        return None
    family = get_family(name)
    return {"family": name, "label": family.label, "native": native_resolution(path),
            "encoders": [(spec.prefix.removeprefix("lora_"), spec.label) for spec in family.text_encoder_specs]}
