"""Resize an adapter: truncated SVD of each layer's delta to a fixed rank or to a kept share of its norm. Any layer
type goes in (LoCon, LoHa, LoKr, DoRA); a plain LoRA always comes out."""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

from trainer.formats.check import one_family
from trainer.lora_state import Adapter, is_plain

from .delta import type_name
from .lowrank import change_svd, kept_share, layer_from_svd, rank_for_share


def resize(adapter: Adapter, rank: int | None = None, keep: float | None = None,
           label: str = "the adapter", base: Mapping | None = None) -> tuple[Adapter, dict]:
    """Give exactly one of `rank` (every layer to that rank, capped by the layer's own) or `keep` (per layer, the
    smallest rank keeping that share of the Frobenius norm: sqrt(sum kept s^2) / sqrt(sum s^2) >= keep). An
    adapter that mixes model families (`one_family`; `label` names it) is refused. LyCORIS layers (LoHa, LoKr,
    LoCon's Tucker form, DoRA) become plain LoRA: the SVD of their delta (DoRA: of applied(W0) - W0, which needs
    `base`, kohya name -> W0, e.g. delta.base_weights(a model's module index)).

    Returns the new adapter (alpha = rank, so scale 1) and a report: per layer the old and new rank and the kept
    share, plus the overall kept share (over all layers' squared norms) and parameter counts; `converted` counts
    the layers that were not plain LoRA, by type (absent when none).
    """
    if (rank is None) == (keep is None):
        raise ValueError("resize: give exactly one of rank or keep")
    if rank is not None and rank < 1:
        raise ValueError(f"resize: rank must be at least 1, got {rank}")
    if keep is not None and not 0 < keep <= 1:
        raise ValueError(f"resize: keep must be in (0, 1], for example 0.95; got {keep}")
    one_family([(label, adapter)])
    return compress(adapter, rank=rank, keep=keep, base=base)


def compress(adapter: Adapter, rank: int | None = None, keep: float | None = None,
             base: Mapping | None = None) -> tuple[Adapter, dict]:
    groups = ((name, [(layer, 1.0)]) for name, layer in adapter.layers.items())
    return compress_groups(groups, adapter.metadata, adapter.num_parameters(), rank, keep, base)


def compress_groups(groups: Iterable[tuple[str, list]], metadata: dict, parameters_before: int,
                    rank: int | None = None, keep: float | None = None,
                    base: Mapping | None = None) -> tuple[Adapter, dict]:
    """One plain LoRA layer per (name, [(layer, weight), ...]): the truncated SVD of the group's summed change
    (lowrank.change_svd), one layer at a time (a formed delta is freed before the next)."""
    layers, report_layers, converted = {}, {}, Counter()
    kept_sq = total_sq = 0.0
    for name, parts in groups:
        u, s, vh, like = change_svd(name, parts, base)
        k = rank_for_share(s, keep) if keep is not None else min(rank, len(s))
        layers[name] = layer_from_svd(u, s, vh, k, like)
        ranks = [layer.rank for layer, _ in parts]
        report_layers[name] = {"rank_before": sum(ranks) if None not in ranks else None,
                               "rank": layers[name].rank, "kept": kept_share(s, k)}
        converted.update(type_name(layer) for layer, _ in parts if not is_plain(layer))
        total_sq += float((s ** 2).sum())
        kept_sq += float((s[:k] ** 2).sum())
    out = Adapter(layers, dict(metadata))
    out.metadata.update(rank_metadata(out))
    report = {"layers": report_layers, "kept_overall": 1.0 if total_sq == 0 else (kept_sq / total_sq) ** 0.5,
              "parameters_before": parameters_before, "parameters_after": out.num_parameters()}
    if converted:
        report["converted"] = dict(converted)
    return out, report


def rank_metadata(adapter: Adapter) -> dict[str, str]:
    """ss_network_dim/alpha as kohya's resize_lora writes them: the rank, or "Dynamic" when layers differ."""
    ranks = {layer.rank for layer in adapter.layers.values()}
    value = str(ranks.pop()) if len(ranks) == 1 else "Dynamic"
    return {"ss_network_dim": value, "ss_network_alpha": value}
