"""Read kohya, diffusers and peft LoRA files into an `Adapter` keyed by kohya names.

Readers of pickles can run arbitrary code, so only .safetensors files are read.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Iterable

import safetensors
import torch

from trainer.lora_state import Adapter, LohaLayer, LokrLayer, LoraLayer, is_plain, rank_and_width

from .errors import AdapterFormatError
from .fused import split_layers
from .layout import COMPONENTS, DENOISER_COMPONENTS, DIFFUSERS_CONFIG_KEY, shape_problem
from .names import UNET_PREFIX, diffusers_aliases, kohya_name, normalise_kohya_name
from .write import LAYER_TYPES, LYCORIS_KEYS

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}
# OneTrainer names a denoiser that is no UNet by its component (lora_transformer_): read as kohya's lora_unet_
_FOREIGN_PREFIXES = {f"lora_{c}_": UNET_PREFIX + "_" for c in DENOISER_COMPONENTS if f"lora_{c}" != UNET_PREFIX}
_PREFIX_NAMES = sorted({p.removeprefix("lora_") for p in COMPONENTS} | {p[5:-1] for p in _FOREIGN_PREFIXES},
                       key=len, reverse=True)  # the longest first: te1 before te
# LyCORIS's keys beside the plain ones (its modules' weight_list: lycoris modules/locon.py, loha.py, lokr.py)
_KOHYA_KEY = re.compile(rf"^lora_({'|'.join(_PREFIX_NAMES)})_([A-Za-z0-9_]+)\.(lora_down\.weight|lora_up\.weight|"
                        r"alpha|lora_mid\.weight|dora_scale|hada_w[12]_[ab]|hada_t[12]|lokr_w[12](?:_[ab])?|lokr_t2)$")
# OneTrainer's default LoRA output (output_model_format SAFETENSORS, migrated to LEGACY_LORA: OneTrainer
# modules/util/config/TrainConfig.py:859-864, 1044) is its "mixture" layout for SD3 (modelSaver/stableDiffusion3/
# StableDiffusion3LoRASaver.py:14-15 -> util/convert_lora_util.py:85-103): kohya-style keys of the diffusers module
# paths, split q/k/v, the transformer under `lora_transformer_` (the text encoders under lora_te1/2/3_ as ours).
_DIFFUSERS_COMPONENTS = tuple(sorted({*DENOISER_COMPONENTS, *COMPONENTS.values()}, key=len, reverse=True))
_KOHYA_PART = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha", "lora_mid.weight": "mid",
               "dora_scale": "dora_scale"}
# LyCORIS tensor name -> (layer kind, field): the inverse of write.LYCORIS_KEYS
_LYCORIS_FIELDS = {key: (kind, field) for kind, keys in LYCORIS_KEYS.items() if kind != "lora"
                   for field, key in keys.items()}
# module path + which tensor, for the layouts diffusers and peft have written over the years
_MODULE_KEYS = [
    (re.compile(r"^(.+?)\.lora_A(?:\.[A-Za-z0-9_-]+)?\.weight$"), "down"),  # peft (optionally with adapter name)
    (re.compile(r"^(.+?)\.lora_B(?:\.[A-Za-z0-9_-]+)?\.weight$"), "up"),
    (re.compile(r"^(.+?)\.lora(?:_linear_layer)?\.down\.weight$"), "down"),  # diffusers before peft
    (re.compile(r"^(.+?)\.lora(?:_linear_layer)?\.up\.weight$"), "up"),
    (re.compile(r"^(.+?)\.alpha$"), "alpha"),
]
# diffusers' attention-processor era: `attn1.processor.to_q_lora.down.weight`
_OLD_PROCESSOR_KEY = re.compile(r"^(.+?)\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_OLD_UNET_TARGET = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_OLD_TE_TARGET = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_UNKNOWN_HINT = ("LyCORIS's full-weight diffs, IA3, GLoRA, OFT/BOFT and DyLoRA are not layers loradesk can read "
                 "(it reads LoRA, LoCon, LoHa, LoKr and DoRA)")


def load_adapter(source) -> Adapter:
    """Read a kohya, diffusers or peft .safetensors LoRA (or the adapter of a checkpoint or run folder,
    `runs.adapter_file`); every layer is keyed by its kohya name, tensors fp32."""
    from trainer.runs import adapter_file
    path = adapter_file(source) if Path(source).is_dir() else Path(source)  # a file: its own errors name the damage
    state, file_meta = _read_safetensors(path)
    fmt = detect_format(state.keys())
    if fmt == "kohya":
        parts, unknown = _parse_kohya(state)
    elif fmt in ("diffusers", "peft"):
        configs = _diffusers_configs(file_meta) if fmt == "diffusers" else _peft_config(path)
        parts, unknown = _parse_modules(state, configs, file_meta)
    else:
        parts, unknown = {}, sorted(state)
    if unknown:
        raise AdapterFormatError(f"{path}: {len(unknown)} key(s) are not in a LoRA layout loradesk reads (kohya, "
                                 f"diffusers, peft): {_listing(unknown, 10)}. {_UNKNOWN_HINT}; convert the file "
                                 f"to a plain LoRA or use the tool that made it.")
    if not parts:
        raise AdapterFormatError(f"{path} holds no LoRA layers; is it an adapter file?")
    _refuse_integers(parts, path)
    layers = _assemble(parts, path)
    _refuse_non_finite(layers, path)
    _refuse_zero_alphas(layers, path)
    family = _family(layers, file_meta)
    layers = _model_shapes(layers, family)
    layers = _split_fused(layers, family, file_meta, path)
    return Adapter(layers=_original_unet_names(layers, family, file_meta), metadata=dict(file_meta))


def _family(layers: dict[str, LoraLayer], file_meta: dict):
    from trainer.models import family_of_adapter
    return family_of_adapter(layers, family_shapes(layers), file_meta)


def family_shapes(layers: dict) -> dict[str, tuple]:
    """name -> (rank, input width), what family_of_adapter tells families by: a LoRA's down [r, in], a LyCORIS
    layer's rank and its update's width (as models.detect.adapter_family reads them)."""
    return {name: rank_and_width(layer) for name, layer in layers.items()}


def _model_shapes(layers: dict, family) -> dict:
    """LoHa/LoKr layers of a convolution store its factors flattened ([r, in * kh * kw]), so the keys alone give a
    2-d shape [out, in * kh * kw]: the family's standard model (its module index, from configs) says which modules
    are convolutions and their kernel, which is the same at every model width (the tiny test models' too)."""
    flat = [name for name, layer in layers.items()
            if isinstance(layer, (LohaLayer, LokrLayer)) and len(layer.shape) == 2]
    if not flat:
        return layers
    from trainer.models import meta_index
    from trainer.models.detect import default_family
    index = meta_index((family or default_family()).name)
    for name in flat:
        module = index.get(name, (None, None, None))[2]
        kernel = tuple(module.weight.shape[2:]) if module is not None and module.weight.dim() == 4 else ()
        out, flat_in = layers[name].shape
        if kernel and flat_in % math.prod(kernel) == 0:
            layers[name].shape = (out, flat_in // math.prod(kernel), *kernel)
    return layers


def _split_fused(layers: dict[str, LoraLayer], family, file_meta: dict, path: Path) -> dict[str, LoraLayer]:
    """A file whose modules fuse several of the model's (SD3's qkv in the SAI kohya layout) back under the internal
    names: the family says which file names hold which parts (Family.kohya_file_parts; none for a family without)."""
    hook = getattr(family, "kohya_file_parts", None)
    parts = hook(list(layers), file_meta) if hook is not None else []
    if not parts:
        return layers
    typed = [name for name, layer in layers.items() if not is_plain(layer)]
    if typed:
        raise AdapterFormatError(f"{path.name} holds LyCORIS layers ({_listing(typed, 3)}) in a {family.label} file "
                                 f"whose modules fuse several of the model's; loradesk splits only plain LoRA "
                                 f"modules: convert it to a plain LoRA with the tool that made it")
    taken = {part for fused in parts if fused.name in layers for part in fused.parts if part != fused.name}
    clash = sorted(taken & set(layers))
    if clash:
        raise AdapterFormatError(f"{path.name} holds both fused modules and their parts ({_listing(clash, 3)}); "
                                 f"re-export it from the tool that made it")
    return split_layers(layers, parts)


def _refuse_integers(parts: dict[str, dict], path: Path) -> None:
    """A LoRA's factors are floating-point numbers; integer (or bool) ones are no trained adapter (a damaged or
    hand-made file) and would be read as whole-number weights that draw noise or nothing."""
    bad = {name: str(t.dtype).removeprefix("torch.") for name, p in parts.items()
           for part, t in p.items() if part != "alpha" and not t.is_floating_point()}
    if bad:
        kinds = ", ".join(sorted(set(bad.values())))
        raise AdapterFormatError(f"{path.name} holds integer tensors ({kinds}) in {len(bad)} of its {len(parts)} "
                                 f"layers ({_listing(bad, 3)}); a LoRA's weights are floating-point numbers, so it is "
                                 f"not a working adapter: re-export it from the tool that trained it")


def _refuse_zero_alphas(layers: dict[str, LoraLayer], path: Path) -> None:
    """alpha scales each update (delta = alpha/rank * up @ down): with every alpha 0 the adapter changes nothing
    wherever it is used. One zero layer among others is allowed (the others still work)."""
    if layers and all(layer.alpha == 0 for layer in layers.values()):
        raise AdapterFormatError(f"{path.name}: every layer's alpha is 0, which scales each update to zero, so the "
                                 f"adapter does nothing; use a file trained with alpha above 0 (alpha = rank is "
                                 f"scale 1)")


def _refuse_non_finite(layers: dict[str, LoraLayer], path: Path) -> None:
    """An adapter with NaN or infinite values draws a black image wherever it is used: refused at load, naming it
    (a run whose loss became NaN, or a damaged file)."""
    bad = [name for name, layer in layers.items()
           if not (all(torch.isfinite(t).all() for t in layer.tensors().values())
                   and (layer.alpha is None or math.isfinite(float(layer.alpha))))]
    if bad:
        raise AdapterFormatError(f"{path.name} holds NaN or infinite values in {len(bad)} of its {len(layers)} "
                                 f"layers ({_listing(bad, 3)}); it would draw black images. Use an earlier "
                                 f"checkpoint of its run, or train again with a lower learning rate")


def _original_unet_names(layers: dict[str, LoraLayer], family, file_meta: dict) -> dict[str, LoraLayer]:
    """An adapter of a family whose files name UNet modules in the original layout (SDXL), read from a file that
    names them as diffusers does (diffusers' own kohya exporter, diffusers and peft files), under the family's
    names: mapped through the module index of the family's standard model, never by rewriting strings."""
    from trainer.models import meta_index
    diffusers_named = [n for n in layers if n.startswith(("lora_unet_down_blocks_", "lora_unet_mid_block_",
                                                          "lora_unet_up_blocks_"))]
    if family is None or not family.original_unet_names or not diffusers_named:
        return layers
    aliases = diffusers_aliases(meta_index(family.name))
    return {aliases.get(name, name): layer for name, layer in layers.items()}


def detect_format(keys_or_path) -> str:
    """The layout of a file (path) or state dict (its tensor names): kohya, diffusers, peft or unknown."""
    if isinstance(keys_or_path, (str, Path)):
        keys = list(_read_safetensors(Path(keys_or_path), tensors=False)[0])
    else:
        keys = list(keys_or_path)
    if any(_KOHYA_KEY.match(k) for k in keys):
        return "kohya"
    stripped = [_strip_peft_root(k) for k in keys]
    if not any(p.match(k) for k in stripped for p, part in _MODULE_KEYS if part != "alpha") \
            and not any(_OLD_PROCESSOR_KEY.match(k) for k in stripped):
        return "unknown"
    if any(k.startswith(tuple(c + "." for c in _DIFFUSERS_COMPONENTS)) for k in stripped):
        return "diffusers"
    return "peft"


# ---------------------------------------------------------------------------------------------------------------
# reading the file

def _read_safetensors(path: Path, tensors: bool = True) -> tuple[dict, dict[str, str]]:
    """name -> tensor (or None when only the names are wanted) and the file's metadata."""
    _refuse_pickle(path)
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) if tensors else None for k in f.keys()}, f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for every kind of damage
        raise AdapterFormatError(f"{path} is not a readable .safetensors file ({e}); re-download or re-export "
                                 f"it") from None


def _refuse_pickle(path: Path) -> None:
    if not path.is_file():
        raise AdapterFormatError(f"adapter file {path} does not exist; give the path of a .safetensors LoRA")
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header's '{' (the length's first byte may
    # well be 0x80, so test this before the pickle signatures)
    if len(head) == 9 and head[8:9] == b"{" and path.suffix.lower() not in PICKLE_SUFFIXES:
        return
    # pickle protocol 2+ starts with 0x80; torch.save writes a zip archive
    if path.suffix.lower() in PICKLE_SUFFIXES or head[:1] == b"\x80" or head[:4] == b"PK\x03\x04":
        raise AdapterFormatError(f"{path} is a pickle file (.ckpt/.pt/.bin); loading pickles can run arbitrary "
                                 f"code, so loradesk reads only .safetensors. Get the .safetensors release of this "
                                 f"LoRA, or convert it with a tool you trust.")


# ---------------------------------------------------------------------------------------------------------------
# kohya

def _parse_kohya(state: dict) -> tuple[dict, list[str]]:
    parts, unknown = {}, []
    for key, tensor in state.items():
        m = _KOHYA_KEY.match(key)
        if not m:
            unknown.append(key)
            continue
        name = normalise_kohya_name(_foreign_prefix(key.split(".", 1)[0]))
        parts.setdefault(name, {})[_KOHYA_PART.get(m.group(3), m.group(3))] = tensor
    return parts, unknown


def _foreign_prefix(name: str) -> str:
    for foreign, ours in _FOREIGN_PREFIXES.items():
        if name.startswith(foreign):
            return ours + name[len(foreign):]
    return name


# ---------------------------------------------------------------------------------------------------------------
# diffusers / peft

def _parse_modules(state: dict, configs: dict[str, dict], metadata: dict | None = None) -> tuple[dict, list[str]]:
    found_keys = {key: _module_and_part(_strip_peft_root(key).replace(".processor.", ".")) for key in state}
    components = {}  # text-encoder component -> its kind, from its module paths (T5's blocks or CLIP's layers)
    for found in found_keys.values():
        if found and found[0][0].startswith("text_encoder"):
            t5 = found[0][1].startswith("encoder.block.")
            components[found[0][0]] = "t5" if t5 or components.get(found[0][0]) == "t5" else "clip"
    # a component no family declares (text_encoder_3 before SD3 is known) keeps the prefix layout.COMPONENTS gives
    fallback = {component: prefix for prefix, component in COMPONENTS.items() if prefix != UNET_PREFIX}
    prefixes = {**fallback, **_text_prefixes(found_keys.values(), components, metadata or {}),
                **dict.fromkeys(DENOISER_COMPONENTS, UNET_PREFIX)}
    parts, unknown, paths = {}, [], {}
    for key, tensor in state.items():
        found = found_keys[key]
        if found is None:
            unknown.append(key)
            continue
        (component, path), part = found
        prefix = prefixes[_component_of(component, path)]
        name = kohya_name(prefix, path)
        paths[name] = (component, path)
        parts.setdefault(name, {})[part] = tensor
    for name, layer in parts.items():
        if "alpha" not in layer and "down" in layer:
            component, path = paths[name]
            alpha = _config_alpha(configs.get(component), path, layer["down"].shape[0])
            if alpha is not None:
                layer["alpha"] = torch.tensor(alpha)
    return parts, unknown


def _text_prefixes(found, components: dict[str, str], metadata: dict) -> dict[str, str]:
    """diffusers text-encoder component -> kohya prefix: the family's that the file's metadata or denoiser names
    claim (a FLUX file's lone text_encoder is CLIP-L, lora_te1, not SD 1.x's lora_te), else the family with the
    fewest encoders of the file's kinds (models.detect.text_encoder_prefixes)."""
    from trainer.models.detect import family_of_adapter, text_encoder_prefixes
    denoiser = {kohya_name(UNET_PREFIX, f[0][1]) for f in found if f and f[0][0] in DENOISER_COMPONENTS}
    family = family_of_adapter(denoiser, {}, metadata) if (denoiser or metadata) else None
    if family is not None and set(components) <= {spec.component for spec in family.text_encoder_specs}:
        return {spec.component: spec.prefix for spec in family.text_encoder_specs}
    return text_encoder_prefixes(components)


def _module_and_part(key: str):
    m = _OLD_PROCESSOR_KEY.match(key)
    if m:
        component, path = _split_component(m.group(1))
        targets = _OLD_TE_TARGET if component.startswith("text_encoder") or "text_model" in path else _OLD_UNET_TARGET
        return (component, f"{path}.{targets[m.group(2)]}"), m.group(3)
    for pattern, part in _MODULE_KEYS:
        m = pattern.match(key)
        if m:
            return _split_component(m.group(1)), part
    return None


def _split_component(path: str) -> tuple[str, str]:
    for component in _DIFFUSERS_COMPONENTS:
        if path.startswith(component + "."):
            return component, path[len(component) + 1:]
    return "", path  # a bare peft file: the component is guessed from the path


def _component_of(component: str, path: str) -> str:
    """The diffusers component of a module; a bare peft file's is guessed from its path."""
    if component:
        return component
    return "text_encoder" if path.startswith(("text_model.", "encoder.layers.")) else "unet"


def _strip_peft_root(key: str) -> str:
    while key.startswith("base_model.model."):
        key = key[len("base_model.model."):]
    return key


def _diffusers_configs(file_meta: dict) -> dict[str, dict]:
    """The per-component peft LoraConfig kwargs diffusers stores in the file's metadata ("unet.r", ...)."""
    raw = file_meta.get(DIFFUSERS_CONFIG_KEY)
    if not raw:
        return {}
    configs: dict[str, dict] = {}
    for key, value in json.loads(raw).items():
        component, _, field = key.rpartition(".")
        configs.setdefault(component, {})[field] = value
    return configs


def _peft_config(path: Path) -> dict[str, dict]:
    """peft's save_pretrained writes the config (with lora_alpha) beside the weights."""
    config_file = path.parent / "adapter_config.json"
    if not config_file.is_file():
        return {}
    return {"": json.loads(config_file.read_text(encoding="utf-8"))}


def _config_alpha(config: dict | None, path: str, rank: int) -> float | None:
    """The alpha a peft LoraConfig gives this module (None without a config: diffusers/peft then mean scale 1)."""
    if not config or config.get("lora_alpha") is None:
        return None
    alpha = float(config["lora_alpha"])
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        # peft's own rule (get_pattern_key): the pattern matches a dotted suffix of the module path
        if any(re.match(rf"(.*\.)?({pattern})$", p) for p in (path, path.removeprefix("text_model."))):
            alpha = float(value)
            break
    if config.get("use_rslora"):
        alpha *= math.sqrt(rank)  # rsLoRA's scale is alpha/sqrt(r); kohya's alpha/r needs alpha*sqrt(r)
    return alpha


# ---------------------------------------------------------------------------------------------------------------

def _assemble(parts: dict[str, dict], path: Path) -> dict[str, LoraLayer]:
    layers, problems = {}, []
    for name in sorted(parts):
        p = parts[name]
        if any(key in _LYCORIS_FIELDS for key in p) or "mid" in p or "dora_scale" in p:
            layer = lycoris_layer(name, p)
            if isinstance(layer, str):
                problems.append(layer)
            else:
                layers[name] = layer
            continue
        problem = shape_problem(name, p.get("down"), p.get("up"))
        if problem:
            problems.append(problem)
            continue
        alpha = float(p["alpha"].float().item()) if "alpha" in p else None
        layers[name] = LoraLayer(down=p["down"].float(), up=p["up"].float(), alpha=alpha)
    if problems:
        raise AdapterFormatError(f"{path}: {len(problems)} layer(s) are malformed: {_listing(problems, 10, '; ')}")
    return layers


def lycoris_layer(name: str, p: dict):
    """A LoCon (Tucker mid, DoRA), LoHa or LoKr layer from one module's tensors (keys as in the file, plain LoRA's
    down/up/mid/alpha/dora_scale as _KOHYA_PART names them), fp32; or a line saying why it cannot be one."""
    kinds = {_LYCORIS_FIELDS[key][0] for key in p if key in _LYCORIS_FIELDS}
    if len(kinds) > 1 or (kinds and ("down" in p or "up" in p)):
        return f"{name}: mixes the tensors of several LyCORIS algorithms ({', '.join(sorted(p))})"
    kind = kinds.pop() if kinds else "lora"
    fields = {"down": "down", "up": "up", "mid": "mid"} if kind == "lora" else \
        {key: field for key, (k, field) in _LYCORIS_FIELDS.items() if k == kind}
    values = {field: p[key].float() for key, field in fields.items() if key in p}
    alpha = float(p["alpha"].float().item()) if "alpha" in p else None
    dora = p["dora_scale"].float() if "dora_scale" in p else None
    missing = _missing_factors(kind, values)
    if missing:
        return f"{name}: a {kind} layer without {missing}"
    if kind == "lora":
        problem = shape_problem(name, values["down"], values["up"]) if "mid" not in values else None
        return problem or LoraLayer(**values, alpha=alpha, dora_scale=dora)
    layer = LAYER_TYPES[kind](**values, alpha=alpha, dora_scale=dora)
    layer.shape = _keys_shape(layer)
    return layer


def _missing_factors(kind: str, values: dict) -> str | None:
    need = {"lora": [("down",), ("up",)], "loha": [("w1a",), ("w1b",), ("w2a",), ("w2b",)],
            "lokr": [("w1", "w1a"), ("w2", "w2a")]}[kind]
    need += [("w1b",)] * (kind == "lokr" and "w1" not in values) + [("w2b",)] * (kind == "lokr" and "w2" not in values)
    if kind == "loha" and ("t1" in values) != ("t2" in values):
        return "both Tucker cores (hada_t1 and hada_t2)"
    lacking = [alts[0] for alts in need if not any(a in values for a in alts)]
    return ", ".join(LYCORIS_KEYS[kind][f] for f in lacking) or None


def _keys_shape(layer) -> tuple[int, ...]:
    """The adapted weight's shape as far as the tensors tell (a convolution's flattened w*b read as 2-d; the
    model's index refines it: _model_shapes)."""
    if isinstance(layer, LohaLayer):
        if layer.t1 is not None:  # Tucker: w1a [r, out], w1b [r, in], t1 [r, r, kh, kw] (lycoris modules/loha.py)
            return (layer.w1a.shape[1], layer.w1b.shape[1], *layer.t1.shape[2:])
        return (layer.w1a.shape[0], *layer.w1b.shape[1:])
    w1 = layer.w1.shape if layer.w1 is not None else (layer.w1a.shape[0], layer.w1b.shape[1])
    if layer.w2 is not None:
        w2 = tuple(layer.w2.shape)
    elif layer.t2 is not None:  # w2a [r, out2], w2b [r, in2] (lycoris modules/lokr.py:124-131)
        w2 = (layer.w2a.shape[1], layer.w2b.shape[1], *layer.t2.shape[2:])
    else:
        w2 = (layer.w2a.shape[0], *layer.w2b.shape[1:])
    return (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])


def _listing(items: Iterable[str], limit: int, sep: str = ", ") -> str:
    items = list(items)
    more = f"{sep}... and {len(items) - limit} more" if len(items) > limit else ""
    return sep.join(items[:limit]) + more
