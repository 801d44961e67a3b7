"""export_adapter: any readable LoRA re-written in our kohya or diffusers layout; export_plain_lora: any adapter
(LoCon, LoHa, LoKr, DoRA) as a plain LoRA by SVD of each layer's update, for readers that take plain LoRA only
(diffusers' load_lora_weights reads neither LoHa/LoKr nor dora_scale)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.lora_state import Adapter

from .errors import AdapterFormatError
from .read import load_adapter
from .write import family_of, has_file_layout, save_adapter


def export_adapter(source, out_path, format: str = "auto", dtype: str = "fp16", index: dict | None = None) -> Path:
    """Re-write any readable LoRA (a file, a checkpoint or a run folder) in our kohya or diffusers layout ("auto":
    the one the most programs load for its family, Family.layouts' first), metadata carried over. A run's adapter is written with the module names of the run's own base model (for the kohya
    layout too where the family fuses modules in its files: the widths of parts it lacks come from that model)."""
    from trainer.runs import run_model_index
    adapter = load_adapter(source)
    family = family_of(adapter)
    format = family.layout(format)
    if index is None and (format == "diffusers" or has_file_layout(family)):
        index = run_model_index(source)
    return save_adapter(adapter, out_path, format=format, dtype=dtype, index=index, family=family)


@dataclass
class LowRankReport:
    """How much of the updates a rank-R export keeps: sqrt(sum of kept s^2 / sum of s^2), over all layers and the
    worst layer."""
    kept: float
    worst: float
    worst_layer: str
    layers: int


def export_plain_lora(source, out_path, rank: int, model: str | None = None, dtype: str = "fp16",
                      format: str = "kohya") -> tuple[Path, LowRankReport]:
    """Write `source`'s adapter as a plain LoRA of rank <= `rank` per layer (alpha = rank: scale 1), the best
    rank-R approximation of each update (Eckart-Young). DoRA layers' update depends on the base weight
    (W' - W): taken from `model`, else from the run's own base model."""
    adapter = load_adapter(source)
    weights = _base_weights(adapter, source, model)
    plain, report = plain_lora(adapter, rank, weights)
    plain.metadata = _plain_metadata(adapter.metadata, rank)
    path = save_adapter(plain, out_path, format=format, dtype=dtype, family=family_of(adapter))
    return path, report


def plain_lora(adapter: Adapter, rank: int, weights: dict[str, torch.Tensor] | None = None
               ) -> tuple[Adapter, LowRankReport]:
    """Each layer's update (applied(W) - W for DoRA, `weights`: W by kohya name) truncated to `rank` by SVD: the
    toolkit's resize (trainer.adapters.resize.compress), so export and resize are one rule."""
    from trainer.adapters.resize import compress
    if rank < 1:
        raise ValueError(f"--rank must be at least 1 (got {rank})")
    plain, report = compress(adapter, rank=rank, base=weights)
    kept = report["layers"]
    worst, worst_layer = min(((v["kept"], name) for name, v in kept.items()), default=(1.0, ""))
    return plain, LowRankReport(kept=report["kept_overall"], worst=worst, worst_layer=worst_layer, layers=len(kept))


def _base_weights(adapter: Adapter, source, model: str | None) -> dict[str, torch.Tensor] | None:
    """kohya name -> base weight for the DoRA layers (None when there are none)."""
    dora = [name for name, layer in adapter.layers.items() if layer.dora_scale is not None]
    if not dora:
        return None
    model = model if model is not None else _run_model(source)
    if model is None:
        raise AdapterFormatError(f"{len(dora)} layer(s) are DoRA (e.g. {dora[0]}): their update needs the base "
                                 f"model's weights; give it with --model")
    from trainer.models import load_base_model
    from .check import aligned_names
    base = load_base_model(model)
    index = base.module_index()
    aligned = aligned_names(Adapter(layers={n: adapter.layers[n] for n in dora}), index)
    missing = [n for n in aligned.layers if n not in index]
    if missing:
        raise AdapterFormatError(f"{len(missing)} DoRA layer(s) are not modules of {model} (e.g. {missing[0]}); "
                                 f"give the base model the adapter was trained on")
    by_object = {id(layer): name for name, layer in adapter.layers.items()}
    return {by_object[id(layer)]: index[name][2].weight.detach() for name, layer in aligned.layers.items()}


def _run_model(source) -> str | None:
    from trainer.runs import is_run_dir, load_run_config
    path = Path(source).resolve()
    run_dir = next((p for p in (path, *path.parents) if is_run_dir(p)), None)
    return None if run_dir is None else load_run_config(run_dir).model.path


def _plain_metadata(metadata: dict[str, str], rank: int) -> dict[str, str]:
    """The source's metadata, saying what the file now is: sd-scripts' networks.lora of rank R, alpha R."""
    import json
    meta = dict(metadata)
    meta.update({"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                 "ss_network_alpha": str(float(rank))})
    try:
        args = json.loads(meta["ss_network_args"]) if "ss_network_args" in meta else None
    except ValueError:
        args = None
    if isinstance(args, dict):
        lycoris = ("algo", "conv_dim", "conv_alpha", "factor", "dora_wd", "wd_on_output", "decompose_both",
                   "full_matrix")
        meta["ss_network_args"] = json.dumps({k: v for k, v in args.items() if k not in lycoris})
    return meta
