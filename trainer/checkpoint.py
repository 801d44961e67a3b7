"""Resumable training state in safetensors + JSON (no pickle, so a checkpoint can never run code when loaded).

torch.save would pickle the optimizer state; instead every tensor goes into safetensors under a name derived from
the parameter's name (never its position), and the rest (param_groups, scheduler, step) into JSON.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .atomic import as_os_error
from .network import LoraParams, load_lora_state_dict, lora_state_dict
from .runs import TRAINING_STATE


def _optimizer_to_flat(optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict, dict]:
    """Optimizer state keyed by parameter name instead of index: tensors, and JSON for the rest."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{names[idx]}::{key}"] = value.detach().cpu().contiguous().clone()
            else:
                scalars[f"{names[idx]}::{key}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"scalars": scalars, "param_groups": groups}


def _optimizer_from_flat(optimizer: torch.optim.Optimizer, names: list[str], tensors: dict, meta: dict) -> None:
    index = {name: i for i, name in enumerate(names)}
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        name, field = key.rsplit("::", 1)
        state.setdefault(index[name], {})[field] = value
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _param_names(optimizer: torch.optim.Optimizer, params: LoraParams) -> list[str]:
    """Names of the optimizer's parameters in the order its state_dict numbers them."""
    by_id = {id(p): n for n, p in params.named().items()}
    return [by_id[id(p)] for group in optimizer.param_groups for p in group["params"]]


def save_training_state(folder: Path, params: LoraParams, optimizer, lr_scheduler, step: int, epoch_hint: int
                        ) -> None:
    """Write lora.safetensors, optimizer.safetensors and state.json into `folder` (renamed into place later)."""
    _save(lora_state_dict(params), folder / "lora.safetensors")
    names = _param_names(optimizer, params)
    tensors, meta = _optimizer_to_flat(optimizer, names)
    tensors["__torch_rng_state__"] = torch.get_rng_state()
    _save(tensors, folder / "optimizer.safetensors")
    state = {"step": step, "epoch": epoch_hint, "optimizer": meta, "lr_scheduler": lr_scheduler.state_dict()}
    (folder / TRAINING_STATE).write_text(json.dumps(state), encoding="utf-8")


def _save(tensors: dict, path: Path) -> None:
    """safetensors' save_file; a full or read-only disk is an OSError naming the file (safetensors raises its own
    error type, which the loop would not know as a disk failure)."""
    try:
        save_file(tensors, path)
    except Exception as err:
        named = as_os_error(err, path)
        if named is None:
            raise
        raise named from None


def load_training_state(folder: Path, params: LoraParams, optimizer, lr_scheduler) -> int:
    """Restore what save_training_state wrote; returns the step to continue from."""
    load_lora_state_dict(params, load_file(folder / "lora.safetensors"))
    state = json.loads((folder / TRAINING_STATE).read_text(encoding="utf-8"))
    tensors = load_file(folder / "optimizer.safetensors")
    rng = tensors.pop("__torch_rng_state__", None)
    _optimizer_from_flat(optimizer, _param_names(optimizer, params), tensors, state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if rng is not None:
        torch.set_rng_state(rng)
    return int(state["step"])
