"""Write an `Adapter` as a kohya or diffusers safetensors file, atomically."""
from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import safetensors.torch
import torch

from trainer.atomic import atomic_path
from trainer.lora_state import Adapter, LohaLayer, LokrLayer, LoraLayer, axis_shape, dora_axis, is_plain

from .errors import AdapterFormatError
from .layout import COMPONENTS, DIFFUSERS_CONFIG_KEY, FORMATS, check_metadata, shape_problem, torch_dtype
from .fused import fuse_layers
from .names import UNET_PREFIX, normalise_path, resolve_paths


def save_adapter(adapter: Adapter, path, format: str = "kohya", dtype: str = "fp16",
                 metadata: dict[str, str] | None = None, index: dict | None = None, family=None) -> Path:
    """Write `adapter` to `path` (.safetensors) in the kohya or diffusers layout; returns the path. The diffusers
    layout needs each layer's module path: from `index` (a model's module_index), else from the standard model of
    the family the adapter was made for. `family` (trainer.models.family.Family; else the adapter's, else SD 1.x)
    says the denoiser's component, whether the diffusers layout folds alpha, and how kohya files group modules."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"adapter files are written as .safetensors; name {path} with that suffix")
    if not adapter.layers:
        raise AdapterFormatError(f"cannot write {path}: the adapter has no layers")
    if format not in FORMATS:
        raise ValueError(f"unknown adapter format {format!r}; choose one of {', '.join(FORMATS)}")
    dt = torch_dtype(dtype)
    problems = [p for n, layer in adapter.layers.items()
                if is_plain(layer) and (p := shape_problem(n, layer.down, layer.up))]
    if problems:
        raise AdapterFormatError(f"cannot write {path}: " + "; ".join(problems[:10]))
    meta = {"format": "pt", **adapter.metadata, **(metadata or {})}
    # a config carried over from a diffusers file we read: diffusers refuses a kohya file that has one (it cannot
    # take both network alphas and a config), and the diffusers writer makes a fresh one
    meta.pop(DIFFUSERS_CONFIG_KEY, None)
    family = family or family_of(adapter)
    if is_lycoris(adapter):
        tensors = _lycoris_file(adapter, dt, format, family, path)
    elif format == "kohya":
        tensors = kohya_tensors(adapter, dt, file_layout(adapter, family, index))
    else:
        tensors, configs = diffusers_tensors(adapter, dt, index, family)
        meta[DIFFUSERS_CONFIG_KEY] = json.dumps(configs, sort_keys=True)
    meta = check_metadata(meta, str(path))
    write_atomically(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=meta))
    return path


def kohya_tensors(adapter: Adapter, dt: torch.dtype, layout=()) -> dict[str, torch.Tensor]:
    """`<name>.lora_down.weight`, `<name>.lora_up.weight`, `<name>.alpha` (0-d, in the save dtype as sd-scripts).

    Every layer gets the same alpha: diffusers 0.42 applies only the most common alpha of a kohya file (the
    alpha_pattern it builds never matches a module), so a layer whose alpha differs has the ratio folded into its
    up weight instead. Each delta stays (alpha/r) * up @ down exactly, for diffusers, A1111 and ComfyUI alike.

    With a `layout` (Family.kohya_file_layout: a list of FusedName) the layers are written under the file's names,
    fused where it says (trainer.formats.fused), each module with its own alpha: diffusers reads no such file.
    """
    if layout:
        return _fused_kohya_tensors(adapter, dt, layout)
    alphas = {name: _alpha(layer) for name, layer in adapter.layers.items()}
    # alpha 0 (a zero delta) cannot carry other layers' scales, so it never becomes the shared alpha of a mixed set
    counts = collections.Counter(a for a in alphas.values() if a != 0 or len(set(alphas.values())) == 1)
    common = counts.most_common(1)[0][0] if counts else 1.0
    out = {}
    for name in sorted(adapter.layers):
        layer = adapter.layers[name]
        up = layer.up if alphas[name] == common else layer.up.double() * (alphas[name] / common)
        out[f"{name}.lora_down.weight"] = _copy(layer.down, dt)
        out[f"{name}.lora_up.weight"] = _copy(up, dt)
        out[f"{name}.alpha"] = torch.tensor(common, dtype=dt)
    return out


# ---------------------------------------------------------------------------------------------------------------
# LyCORIS: each layer's tensors under LyCORIS's own names (what its modules' custom_state_dict writes: lycoris
# modules/locon.py:244-252, loha.py:249-258, lokr.py:400-417), under the kohya module names of plain files

LYCORIS_KEYS = {
    "lora": {"down": "lora_down.weight", "up": "lora_up.weight", "mid": "lora_mid.weight"},
    "loha": {"w1a": "hada_w1_a", "w1b": "hada_w1_b", "w2a": "hada_w2_a", "w2b": "hada_w2_b", "t1": "hada_t1",
             "t2": "hada_t2"},
    "lokr": {"w1": "lokr_w1", "w1a": "lokr_w1_a", "w1b": "lokr_w1_b", "w2": "lokr_w2", "w2a": "lokr_w2_a",
             "w2b": "lokr_w2_b", "t2": "lokr_t2"},
}
LAYER_TYPES = {"lora": LoraLayer, "loha": LohaLayer, "lokr": LokrLayer}


def is_lycoris(adapter: Adapter) -> bool:
    return any(not is_plain(layer) for layer in adapter.layers.values())


def _lycoris_file(adapter: Adapter, dt: torch.dtype, format: str, family, path: Path) -> dict[str, torch.Tensor]:
    kinds = sorted({layer.kind for layer in adapter.layers.values()})
    if format != "kohya":
        # diffusers reads neither LoHa/LoKr nor dora_scale (its kohya converter drops it); no layout of its own fits
        raise AdapterFormatError(f"cannot write {path.name} in the {format} layout: its layers are LyCORIS "
                                 f"({', '.join(kinds)}, Tucker cores or DoRA); write the kohya layout, or export "
                                 f"--format lora --rank R for a plain LoRA (SVD of each update)")
    if has_file_layout(family):
        raise AdapterFormatError(f"cannot write {path.name}: {family.label} files fuse modules, which LyCORIS "
                                 f"layers cannot be; export --format lora --rank R for a plain LoRA")
    return lycoris_tensors(adapter, dt)


def lycoris_tensors(adapter: Adapter, dt: torch.dtype) -> dict[str, torch.Tensor]:
    """`<name>.<LyCORIS key>` for every factor, `<name>.alpha` per module (LyCORIS writes each module's own) and
    `<name>.dora_scale` in the shape that names its axis ([out, 1, ...] or [1, in, ...])."""
    out = {}
    for name in sorted(adapter.layers):
        layer = adapter.layers[name]
        for field, key in LYCORIS_KEYS[layer.kind].items():
            tensor = getattr(layer, field)
            if tensor is not None:
                out[f"{name}.{key}"] = _copy(tensor, dt)
        out[f"{name}.alpha"] = torch.tensor(_alpha(layer), dtype=dt)
        if layer.dora_scale is not None:
            out[f"{name}.dora_scale"] = _copy(dora_shaped(layer.dora_scale, _delta_dims(layer)), dt)
    return out


def dora_shaped(magnitude: torch.Tensor, dims: int) -> torch.Tensor:
    """The magnitude as LyCORIS stores it (modules/locon.py:116-135): [out, 1, ...] per output row, [1, in, ...]
    per input column, with as many dimensions as the weight. That shape is the axis for ComfyUI since the
    wd_on_output_axis branch (comfy/weight_adapter/base.py:62-89 at 9c0cf36, v0.3.77) and Forge since 0ced1d0
    (backend/patcher/lora.py:52-81); older ComfyUI/Forge and A1111 (extensions-builtin/Lora/network.py
    apply_weight_decompose) apply [1, in] only, and LyCORIS 4.1.3's reader loads [out, 1] only
    (lora_state.dora_axis)."""
    axis = dora_axis(magnitude)
    return magnitude.reshape(axis_shape(magnitude.numel(), dims, axis))


def _delta_dims(layer) -> int:
    if isinstance(layer, LoraLayer):
        return layer.down.dim()
    return len(layer.shape) if layer.shape else layer.delta().dim()


def _fused_kohya_tensors(adapter: Adapter, dt: torch.dtype, layout) -> dict[str, torch.Tensor]:
    layers = fuse_layers(adapter.layers, layout)
    out = {}
    for name in sorted(layers):
        layer = layers[name]
        out[f"{name}.lora_down.weight"] = _copy(layer.down, dt)
        out[f"{name}.lora_up.weight"] = _copy(layer.up, dt)
        out[f"{name}.alpha"] = torch.tensor(_alpha(layer), dtype=dt)
    return out


def family_of(adapter: Adapter):
    """The family an adapter was made for (trainer.models.family_of_adapter), SD 1.x when nothing tells."""
    from trainer.models.detect import adapter_family
    return adapter_family(adapter)


def file_layout(adapter: Adapter, family, index: dict | None = None) -> list:
    """The family's kohya file layout for this adapter ([] for a family that writes one module per layer). The
    module index is built (from the family's standard model when none is given) only for a family that has one."""
    if not has_file_layout(family):
        return []
    from trainer.models import adapter_index
    return family.kohya_file_layout(index if index is not None else adapter_index(adapter))


def has_file_layout(family) -> bool:
    """Whether the family overrides Family.kohya_file_layout (SD 1.x/2.x/SDXL do not: their files are unchanged)."""
    from trainer.models.family import Family
    hook = getattr(type(family), "kohya_file_layout", None)
    return hook is not None and hook is not Family.kohya_file_layout


def as_saved(adapter: Adapter, dtype: str = "fp16") -> Adapter:
    """`adapter` exactly as a kohya file in `dtype` holds it, without writing one: factors rounded to the save dtype,
    one shared alpha (kohya_tensors' rule). What A1111 and ComfyUI read back, so samples can be rendered from it."""
    if is_lycoris(adapter):
        return Adapter(layers={name: _rounded(layer, torch_dtype(dtype)) for name, layer in adapter.layers.items()},
                       metadata=dict(adapter.metadata))
    tensors = kohya_tensors(adapter, torch_dtype(dtype))
    layers = {name: LoraLayer(down=tensors[f"{name}.lora_down.weight"], up=tensors[f"{name}.lora_up.weight"],
                              alpha=float(tensors[f"{name}.alpha"])) for name in adapter.layers}
    return Adapter(layers=layers, metadata=dict(adapter.metadata))


def _rounded(layer, dt: torch.dtype):
    """A LyCORIS layer with its tensors as a file in `dt` holds them (alpha too, as lycoris_tensors writes it)."""
    fields = {f: getattr(layer, f) for f in (*LYCORIS_KEYS[layer.kind], "dora_scale")}
    fields = {f: None if t is None else t.to(dt).float() for f, t in fields.items()}
    extra = {} if isinstance(layer, LoraLayer) else {"shape": layer.shape}
    alpha = float(torch.tensor(_alpha(layer), dtype=dt))
    return LAYER_TYPES[layer.kind](**fields, alpha=alpha, **extra)


def _alpha(layer) -> float:
    # a layer read without alpha means scale 1; alpha = rank says the same to every reader (a LoKr of two full
    # matrices has no rank and scale 1 whatever its alpha: LyCORIS modules/lokr.py:210-212, ComfyUI alike)
    if layer.alpha is not None:
        return float(layer.alpha)
    return float(layer.rank) if layer.rank else 1.0


def diffusers_tensors(adapter: Adapter, dt: torch.dtype, index: dict | None = None, family=None
                      ) -> tuple[dict[str, torch.Tensor], dict]:
    """What `save_lora_weights` writes: `unet.<path>.lora_A.weight` / `.lora_B.weight` (`transformer.` for a family
    whose denoiser is one, and `text_encoder.`, `text_encoder_2.`, `text_encoder_3.`), paths in diffusers' layout
    whatever layout the kohya names were in.

    diffusers refuses tensor keys without 'lora' in them, so alphas cannot travel as `.alpha` keys; they go, as
    diffusers itself stores them, into a peft LoraConfig per component under the `lora_adapter_metadata` key.
    A family with diffusers_alpha_folded has alpha/rank multiplied into up and lora_alpha = r in the config, so
    readers that ignore the config (ComfyUI, A1111) get the trained scale too.
    """
    family = family or family_of(adapter)
    components = {**COMPONENTS, **{spec.prefix: spec.component for spec in family.text_encoder_specs},
                  UNET_PREFIX: family.denoiser_component}
    folded = bool(getattr(family, "diffusers_alpha_folded", False))
    paths = _module_paths(adapter, index)
    tensors, layers_by_component = {}, collections.defaultdict(dict)
    for name in sorted(adapter.layers):
        layer = adapter.layers[name]
        prefix, path = paths[name]
        path = normalise_path(prefix, path)
        component = components[prefix]
        alpha = _alpha(layer)
        up = layer.up.double() * (alpha / layer.rank) if folded and alpha != layer.rank else layer.up
        alpha = float(layer.rank) if folded else alpha
        tensors[f"{component}.{path}.lora_A.weight"] = _copy(layer.down, dt)
        tensors[f"{component}.{path}.lora_B.weight"] = _copy(up, dt)
        # config patterns are matched as path suffixes, so drop `text_model.` to fit both CLIP layouts
        layers_by_component[component][path.removeprefix("text_model.")] = (layer.rank, alpha)
    configs = {}
    for component, layers in layers_by_component.items():
        for key, value in lora_config(layers).items():
            configs[f"{component}.{key}"] = value
    return tensors, configs


def _module_paths(adapter: Adapter, index: dict | None) -> dict[str, tuple[str, str]]:
    from trainer.models import adapter_index
    found, unknown = resolve_paths(adapter.layers, index if index is not None else adapter_index(adapter))
    if unknown:
        raise AdapterFormatError(f"{len(unknown)} layer(s) are not modules of the model this adapter was made for "
                                 f"(e.g. {', '.join(unknown[:3])}); export it with that base model at hand (a run "
                                 f"folder, or --model) so its own module names are used")
    return found


def lora_config(layers: dict[str, tuple[int, float]]) -> dict:
    """peft LoraConfig kwargs: the most common rank/alpha, plus per-module patterns for the others."""
    r = collections.Counter(rank for rank, _ in layers.values()).most_common(1)[0][0]
    alpha = collections.Counter(a for _, a in layers.values()).most_common(1)[0][0]
    return {"r": r, "lora_alpha": alpha, "target_modules": sorted(layers),
            "rank_pattern": {re.escape(p): rk for p, (rk, _) in layers.items() if rk != r},
            "alpha_pattern": {re.escape(p): a for p, (_, a) in layers.items() if a != alpha}}


def write_atomically(path: Path, write) -> None:
    """`write(tmp_path)` through trainer.atomic: readers never see half a file."""
    with atomic_path(path) as tmp:
        write(str(tmp))


def _copy(tensor: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    # a fresh contiguous CPU tensor: safetensors refuses views that share storage
    return tensor.detach().to("cpu", dtype=dt, copy=True).contiguous()
