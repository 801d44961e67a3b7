"""Resize an adapter: truncated SVD of each layer's delta to a fixed rank or to a kept share of its norm."""
from __future__ import annotations

from trainer.formats.check import one_family
from trainer.lora_state import Adapter

from .lowrank import kept_share, layer_from_svd, layer_svd, rank_for_share


def resize(adapter: Adapter, rank: int | None = None, keep: float | None = None,
           label: str = "the adapter") -> tuple[Adapter, dict]:
    """Give exactly one of `rank` (every layer to that rank, capped by the layer's own) or `keep` (per layer, the
    smallest rank keeping that share of the Frobenius norm: sqrt(sum kept s^2) / sqrt(sum s^2) >= keep). An
    adapter that mixes model families (`one_family`; `label` names it) is refused.

    Returns the new adapter (alpha = rank, so scale 1) and a report: per layer the old and new rank and the kept
    share, plus the overall kept share (over all layers' squared norms) and parameter counts.
    """
    if (rank is None) == (keep is None):
        raise ValueError("resize: give exactly one of rank or keep")
    if rank is not None and rank < 1:
        raise ValueError(f"resize: rank must be at least 1, got {rank}")
    if keep is not None and not 0 < keep <= 1:
        raise ValueError(f"resize: keep must be in (0, 1], for example 0.95; got {keep}")
    one_family([(label, adapter)])
    return compress(adapter, rank=rank, keep=keep)


def compress(adapter: Adapter, rank: int | None = None, keep: float | None = None) -> tuple[Adapter, dict]:
    layers, report_layers = {}, {}
    kept_sq = total_sq = 0.0
    for name, layer in adapter.layers.items():
        u, s, vh = layer_svd(layer)
        k = rank_for_share(s, keep) if keep is not None else min(rank, len(s))
        layers[name] = layer_from_svd(u, s, vh, k, layer)
        share = kept_share(s, k)
        report_layers[name] = {"rank_before": layer.rank, "rank": layers[name].rank, "kept": share}
        total_sq += float((s ** 2).sum())
        kept_sq += float((s[:k] ** 2).sum())
    out = Adapter(layers, dict(adapter.metadata))
    out.metadata.update(rank_metadata(out))
    report = {"layers": report_layers, "kept_overall": 1.0 if total_sq == 0 else (kept_sq / total_sq) ** 0.5,
              "parameters_before": adapter.num_parameters(), "parameters_after": out.num_parameters()}
    return out, report


def rank_metadata(adapter: Adapter) -> dict[str, str]:
    """ss_network_dim/alpha as kohya's resize_lora writes them: the rank, or "Dynamic" when layers differ."""
    ranks = {layer.rank for layer in adapter.layers.values()}
    value = str(ranks.pop()) if len(ranks) == 1 else "Dynamic"
    return {"ss_network_dim": value, "ss_network_alpha": value}
