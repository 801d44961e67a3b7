"""Does an adapter fit a model? Names present, delta shapes equal to weight shapes."""
from __future__ import annotations

from torch import nn

from trainer.lora_state import Adapter, delta_shape

from .errors import AdapterFormatError
from .names import diffusers_aliases

Index = dict[str, tuple[str, str, nn.Module]]


def check_against_model(adapter: Adapter, index: Index) -> None:
    """Raise AdapterFormatError listing layers with no module in the model and layers whose shapes differ."""
    missing = [name for name in adapter.layers if name not in index]
    mismatched = []
    for name, layer in adapter.layers.items():
        if name in index:
            weight_shape = tuple(index[name][2].weight.shape)
            if not _same_shape(delta_shape(layer), weight_shape):
                mismatched.append(f"{name}: adapter delta shape {delta_shape(layer)} vs model weight shape "
                                  f"{weight_shape}")
    problems = []
    if missing:
        more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
        problems.append(f"{len(missing)} layer(s) have no module in this model: {', '.join(missing[:20])}{more}")
    if mismatched:
        problems.append(f"{len(mismatched)} layer(s) do not fit their module: {'; '.join(mismatched[:20])}")
    if problems:
        raise AdapterFormatError("the adapter does not fit this base model (was it trained for another model "
                                 "family, e.g. SDXL vs SD1.x?): " + " | ".join(problems))


def align_to_model(adapter: Adapter, index: Index, family=None) -> Adapter:
    """aligned_names(), then the fit: every layer a module of the model, of its shape (naming the families when
    they differ)."""
    aligned = aligned_names(adapter, index)
    mismatch = family_mismatch(aligned, family)
    if mismatch and any(name not in index for name in aligned.layers):
        raise AdapterFormatError(mismatch)
    check_against_model(aligned, index)
    return aligned


def aligned_names(adapter: Adapter, index: Index) -> Adapter:
    """The adapter under the names the model's index uses: `lora_te1_` <-> `lora_te_` (diffusers' kohya converter
    writes `lora_te1_` even for SD1.x, whose single text encoder kohya calls `lora_te`), and diffusers' UNet paths
    -> the original layout where the family names them so (SDXL)."""
    aliases = diffusers_aliases(index)
    renames = _single_encoder_rename(adapter, {prefix for prefix, _, _ in index.values()})
    layers = {}
    for name, layer in adapter.layers.items():
        name = aliases.get(name, name)
        for old, new in renames.items():
            if name.startswith(old + "_"):
                name = new + name[len(old):]
        layers[name] = layer
    if list(layers) == list(adapter.layers):
        return adapter  # nothing renamed: the same object (callers compare adapters by identity)
    return Adapter(layers=layers, metadata=dict(adapter.metadata))


def _single_encoder_rename(adapter: Adapter, model_prefixes: set[str]) -> dict[str, str]:
    """{adapter's text-encoder prefix: the model's} when both have exactly one text encoder under different
    prefixes (lora_te1 written for SD 1.x's lora_te, or the other way round); {} otherwise."""
    from .names import TEXT_ENCODER_PREFIXES
    model = model_prefixes & set(TEXT_ENCODER_PREFIXES)
    theirs = {p for p in TEXT_ENCODER_PREFIXES if any(n.startswith(p + "_") for n in adapter.layers)}
    if len(model) == 1 and len(theirs) == 1 and model != theirs:
        return {theirs.pop(): model.pop()}
    return {}


def family_mismatch(adapter: Adapter, family, label: str = "this adapter") -> str | None:
    """'this adapter was made for SDXL; the base model is Stable Diffusion 1.x' when the adapter tells its family
    and it is not the model's; None otherwise. The family check of every command: upload, bake and generate ask
    it against their base model, blend and resize (no model) ask `one_family`."""
    if family is None:
        return None
    made = made_for(adapter, label)
    if made is None or made.name == family.name:
        return None
    return (f"{label} was made for {made.label} ({made.name}); the base model is {family.label} "
            f"({family.name}): pick a base model of the adapter's family, or an adapter trained for this one")


def made_for(adapter: Adapter, label: str = "the adapter"):
    """The family an adapter was made for (trainer.models.family_of_adapter: its metadata, else its layer names and
    widths), or None when nothing tells. A file whose metadata names one family and whose layers are another's
    (a blend of two families, a converter's stale metadata) is refused: no model takes both."""
    from trainer.models import family_of_adapter
    from .read import family_shapes
    shapes = family_shapes(adapter.layers)
    by_layers = family_of_adapter(adapter.layers, shapes)
    by_metadata = family_of_adapter((), {}, adapter.metadata)
    if by_layers is not None and by_metadata is not None and by_layers is not by_metadata:  # one object a family
        raise AdapterFormatError(f"{label} says it was made for {by_metadata.label} (ss_base_model_version) but its "
                                 f"layers are {by_layers.label}'s: it mixes two model families; use the files it "
                                 f"was made from, or the tool's original export")
    return by_metadata or by_layers


def one_family(adapters: list[tuple[str, Adapter]]) -> None:
    """Adapters that go into one file (blend, resize) must be made for one model family: `(label, adapter)` pairs,
    labels naming the files. Adapters that do not tell their family pass (the model they meet decides)."""
    known = [(label, family) for label, adapter in adapters if (family := made_for(adapter, label)) is not None]
    for label, family in known[1:]:
        first_label, first = known[0]
        if family is not first:
            raise AdapterFormatError(f"{first_label} was made for {first.label} ({first.name}) and {label} for "
                                     f"{family.label} ({family.name}): one file cannot serve both; blend adapters "
                                     f"made for one base model family")


def _same_shape(delta: tuple[int, ...], weight: tuple[int, ...]) -> bool:
    # a linear delta fits a 1x1 conv and back (SD2 vs SD1 proj_in/proj_out); A1111 and diffusers reshape likewise
    return delta == weight or (delta[:2] == weight[:2] and all(d == 1 for d in delta[2:] + weight[2:]))


def check_adapter(source, model_path: str = "") -> Adapter:
    """An adapter file (or checkpoint or run folder) read and checked against a base model from its config files
    only, without loading weights: finite values (the reader), every layer a module of the model, of its shape.
    Where the model's configs cannot be found without loading it, only the reading is checked (the fit is then
    checked when the model loads)."""
    from trainer.models.detect import family_of_folder
    from trainer.models.info import config_folder, resolve_model_path
    from trainer.models.meta import model_index

    from .read import load_adapter
    adapter = load_adapter(source)
    try:
        index = model_index(model_path)
    except FileNotFoundError:
        return adapter
    align_to_model(adapter, index, family_of_folder(config_folder(resolve_model_path(model_path))))
    return adapter


def consumer_warnings(adapter: Adapter) -> list[str]:
    """Lines saying which programs will not apply a LyCORIS adapter's file as it was trained, and the fix.

    DoRA per output row (LyCORIS's and peft's default): A1111's built-in Lora normalises per input column only
    (extensions-builtin/Lora/network.py, NetworkModule.apply_weight_decompose: merged.transpose(0, 1) norm), so an
    [out, 1] magnitude broadcasts against [1, in] norms; ComfyUI and Forge with the output-axis branch normalise it
    by the base weight's norm, not the merged weight's (comfy/weight_adapter/base.py:62-89 weight_decompose at
    9c0cf36, v0.3.77; Forge backend/patcher/lora.py:52-81 since 0ced1d0), and older ones per input column.
    DoRA per input column: A1111, ComfyUI and Forge (every version) apply it as trained, but LyCORIS 4.1.3's own
    reader (kohya.py:159-245 create_network_from_weights -> make_module_from_state_dict) cannot load it: it builds
    every module with an output-row magnitude (modules/locon.py:171-189) and copy_ of [1, in] into [out, 1] fails.
    diffusers reads neither LoHa/LoKr nor dora_scale (its kohya converter drops it)."""
    from trainer.lora_state import dora_axis
    dora = [layer for layer in adapter.layers.values() if layer.dora_scale is not None]
    out_axis = sum(dora_axis(layer.dora_scale) == "out" for layer in dora)
    lines = []
    if out_axis:
        lines.append(f"warning: {out_axis} DoRA layer(s) are scaled per output row: A1111 applies a DoRA magnitude "
                     f"per input column only, and ComfyUI/Forge divide an output-row magnitude by the base weight's "
                     f"norm (older versions: per input column), so neither draws it as trained (LyCORIS does). Fix: "
                     f"train with network.dora_axis=in, or export --format lora --rank R (a plain LoRA by SVD, with "
                     f"the base model)")
    if len(dora) > out_axis:
        lines.append(f"note: {len(dora) - out_axis} DoRA layer(s) are scaled per input column: A1111, ComfyUI and "
                     f"Forge apply them as trained, but LyCORIS's own loader (lycoris-lora 4.1.3, "
                     f"create_network_from_weights) cannot read that dora_scale; for it export --format lora --rank R")
    plain_only = sorted({layer.kind for layer in adapter.layers.values() if layer.kind != "lora"})
    if plain_only or dora:
        what = ", ".join(plain_only + (["DoRA"] if dora else []))
        lines.append(f"note: diffusers' load_lora_weights does not apply {what} layers; for diffusers export "
                     f"--format lora --rank R")
    return lines
