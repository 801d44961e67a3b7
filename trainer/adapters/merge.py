"""Merge several weighted adapters into one.

Never average A and B separately: (sum w_i B_i)(sum w_i A_i) has cross terms B_i A_j that none of the adapters
learnt. `merge_exact` stacks the ranks instead (the product of the stacked factors is exactly sum_i w_i s_i B_i A_i);
`merge_svd` compresses that exact sum per layer by truncated SVD. LyCORIS layers (LoHa, LoKr, LoCon's Tucker form,
DoRA) have no ranks to stack: an adapter with them blends to file only through `merge_svd`, as a plain LoRA by SVD of
each layer's summed change (trainer.adapters.delta's rule, the Generate tab's).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path


from trainer.finite import adapter_weight
from trainer.formats import AdapterFormatError
from trainer.formats.check import one_family
from trainer.lora_state import Adapter

from .delta import is_plain, type_name
from .lowrank import stack_layers
from .resize import compress, compress_groups, rank_metadata

# metadata every source must agree on to be carried over (which base model the adapter is for)
_SHARED_KEYS = ("ss_base_model_version", "ss_v2", "modelspec.architecture", "ss_sd_model_name")


def merge_exact(pairs: list[tuple[Adapter, float]], titles: list[str] | None = None,
                labels: list[str] | None = None) -> Adapter:
    """One adapter whose delta on every layer is sum_i w_i * delta_i, exactly.

    down = concat of the downs, up = concat of w_i * scale_i * up_i, alpha = total rank (scale 1); rank = sum of the
    ranks of the adapters that have the layer; layers = the union. Zero weights are left out. `titles` (for
    example the file names) go into the `loradesk.merged_from` metadata; `labels` name the adapters in errors
    (default: the titles). Weights must be finite and the adapters made for one model family, of plain LoRA layers
    (others: merge_svd).
    """
    pairs, sources, labels = _prepared(pairs, titles, labels)
    _refuse_typed(pairs, labels)
    names = list(dict.fromkeys(name for adapter, _ in pairs for name in adapter.layers))
    layers = {name: stack_layers(name, [(a.layers[name], w) for a, w in pairs if name in a.layers]) for name in names}
    merged = Adapter(layers, _merged_metadata(pairs, sources))
    merged.metadata.update(rank_metadata(merged))
    return merged


def merge_svd(pairs: list[tuple[Adapter, float]], rank: int, titles: list[str] | None = None,
              labels: list[str] | None = None, base: Mapping | None = None) -> tuple[Adapter, dict]:
    """The exact merge compressed to `rank` per layer; the report gives each layer's kept share of the Frobenius
    norm (`layers[name]["kept"]`) and the overall share (`kept_overall`). With LyCORIS layers among the inputs:
    the SVD of each layer's summed change (`converted` in the report counts them by type); DoRA layers need
    `base` (kohya name -> W0, e.g. FusedBlender.base_weights())."""
    if rank < 1:
        raise ValueError(f"merge: rank must be at least 1, got {rank}")
    if all(is_plain(layer) for adapter, _ in pairs for layer in adapter.layers.values()):
        return compress(merge_exact(pairs, titles, labels), rank=rank)
    pairs, sources, _ = _prepared(pairs, titles, labels)
    names = list(dict.fromkeys(name for adapter, _ in pairs for name in adapter.layers))
    groups = ((name, [(a.layers[name], w) for a, w in pairs if name in a.layers]) for name in names)
    before = sum(adapter.num_parameters() for adapter, _ in pairs)
    return compress_groups(groups, _merged_metadata(pairs, sources), before, rank=rank, base=base)


def save_merged(adapter: Adapter, path: str | Path, dtype: str = "fp16", index: dict | None = None,
                source: str | Path | None = None) -> list[Path]:
    """Write a tool's result (a blend, a resize) as a run writes its final adapter (loop.export_final): in its
    family's default layout at `path` and, for a family no one layout brings to every program (SD3: diffusers'
    layout loads in diffusers/ComfyUI/A1111, sd-scripts' fused-qkv one in ComfyUI/Forge), each other layout beside
    it as <stem>-<layout>.safetensors. SD 1.x/2.x/SDXL: one kohya file, as before. `index`: the module index of the
    adapter's base model (the widths and block count its layouts need), else that of the model of the run
    `source` lies in; used only when it holds every layer, else the family's standard model gives them. Returns
    the paths written, `path` first."""
    from trainer.formats import save_adapter
    from trainer.formats.write import family_of
    from trainer.runs import run_model_index
    path = Path(path)
    family = family_of(adapter)
    if index is None and source is not None:
        index = run_model_index(source)
    index = index if index is not None and set(adapter.layers) <= set(index) else None
    chosen = family.layout("auto")
    others = [f for f in family.layouts if f != chosen] if family.writes_every_layout else []
    written = [path.with_name(f"{path.stem}-{layout}{path.suffix}") for layout in others]
    for layout, out in zip(others, written):  # the siblings first: `path` appearing means the set is complete
        save_adapter(adapter, out, format=layout, dtype=dtype, index=index, family=family)
    return [save_adapter(adapter, path, format=chosen, dtype=dtype, index=index, family=family), *written]


def _prepared(pairs: list[tuple[Adapter, float]], titles: list[str] | None, labels: list[str] | None):
    """(pairs with finite float weights, zero weights left out; their `merged_from` sources; labels) after the
    family check."""
    titles = list(titles) if titles else [_title(a, i) for i, (a, _) in enumerate(pairs)]
    labels = list(labels) if labels else titles
    pairs = [(adapter, adapter_weight(w, label)) for (adapter, w), label in zip(pairs, labels)]
    one_family([(label, adapter) for (adapter, _), label in zip(pairs, labels)])
    kept = [i for i, (_, w) in enumerate(pairs) if float(w) != 0.0]
    sources = [{"title": titles[i], "weight": float(pairs[i][1])} for i in kept]
    return [(pairs[i][0], float(pairs[i][1])) for i in kept], sources, [labels[i] for i in kept]


def _refuse_typed(pairs: list[tuple[Adapter, float]], labels: list[str]) -> None:
    """An exact merge stacks LoRA ranks; a LyCORIS layer has none to stack (a sum of Kronecker or Hadamard
    products is no LoKr or LoHa), so it is named with the way out."""
    for (adapter, _), label in zip(pairs, labels):
        typed = next((layer for layer in adapter.layers.values() if not is_plain(layer)), None)
        if typed is not None:
            raise AdapterFormatError(f"{label} has {type_name(typed)} layers, which an exact blend (stacked LoRA "
                                     f"ranks) cannot hold: give a rank (--rank) to blend to a plain LoRA by SVD of "
                                     f"the summed deltas")


def _merged_metadata(pairs: list[tuple[Adapter, float]], sources: list[dict]) -> dict[str, str]:
    meta = {"loradesk.merged_from": json.dumps(sources)}
    for key in _SHARED_KEYS:
        values = {a.metadata.get(key) for a, _ in pairs}
        if len(values) == 1 and None not in values:
            meta[key] = values.pop()
    return meta


def _title(adapter: Adapter, i: int) -> str:
    m = adapter.metadata
    return m.get("modelspec.title") or m.get("ss_output_name") or f"adapter {i + 1}"
