"""The Train form <-> a TrainConfig: one widget per config field, generated from trainer.fields().

Some fields are not plain widgets. The trigger belongs to the dataset (the Dataset tab saves it in the dataset
folder, and the trainer reads it from there); the runs folder and the disk cache's folder are this app's settings
(a cache beside any folder the form named could be written anywhere on the server). The text encoders are one
row per encoder of the chosen base model's family (a switch and a learning rate each: SDXL has two, SD3 three), which
stand for network.text_encoders, optimizer.text_encoder_lr and optimizer.text_encoder_lrs; which encoders 'all'
covers is the engine's rule (trainer.named_text_encoders: SD3's T5 only when named).
"""
from __future__ import annotations

from trainer import (TEXT_ENCODER_NAMES, FieldInfo, TrainConfig, config_problems, fields, get_value, layout_choices,
                     leaves_folder, model_summary, named_text_encoders, network_fields_always_read,
                     network_fields_in_use, set_value, text_encoder_lr)

ELSEWHERE = ("dataset.trigger", "saving.runs_dir", "dataset.cache_dir")
READ_KEYS = ("dataset.path", "dataset.regularization_path", "validation.path")  # folders it reads images from
ENCODER_KEYS = ("network.text_encoders", "optimizer.text_encoder_lr", "optimizer.text_encoder_lrs")


def form_fields() -> list[FieldInfo]:
    return [info for info in fields() if info.key not in ELSEWHERE + ENCODER_KEYS]


def config_to_values(cfg: TrainConfig) -> list:
    """Widget values for every form field, in form_fields() order (lists as one item per line)."""
    out = []
    for info in form_fields():
        value = get_value(cfg, info.key)
        out.append("\n".join(value) if info.type is list else value)
    return out


def family_encoders(model_path: str) -> list[tuple[str, str]]:
    """(name, label) of the base model's text encoders (te for SD 1.x/2.x; te1, te2 for SDXL; te1-te3 for SD3)."""
    summary = model_summary(model_path or "")
    return summary["encoders"] if summary else [("te", "text encoder")]


def model_note(path: str) -> str:
    """The detected family of the base model the form names, its native size and text encoders."""
    summary = model_summary(path or "")
    if summary is None:
        return "Base model: its family shows once it loads (a hub id, or a folder without model_index.json)."
    by_default = named_text_encoders(["all"], path or "")
    encoders = " + ".join(f"{label} ({name})" if name in by_default else
                          f"{label} ({name}; frozen unless {name} is named: 'all' leaves it out)"
                          for name, label in summary["encoders"])
    return f"Base model: **{summary['label']}**, native {summary['native']} px; text encoders: {encoders}."


def format_choices(source: str = "") -> list[tuple[str, str]]:
    """The adapter layouts for a base model or a run folder as a dropdown's (label, value) pairs: each labelled by
    the programs that read it, the one that loads in the most programs first (the engine's Family.layouts)."""
    return [(f"{layout}: {programs}", layout) for layout, programs in layout_choices(source)]


def encoder_values(cfg: TrainConfig) -> list:
    """[on, learning rate] for each of TEXT_ENCODER_NAMES, as the encoder rows show them ('all' ticks the ones the
    engine says it covers: not SD3's T5)."""
    named = named_text_encoders(cfg.network.text_encoders, cfg.model.path)
    out = []
    for name in TEXT_ENCODER_NAMES:
        out += [name in named, text_encoder_lr(cfg, name)]
    return out


def apply_encoder_values(cfg: TrainConfig, values: list) -> None:
    """The encoder rows of the model's family back into the three config keys (rows of other families are
    hidden and ignored): exactly the ones 'all' covers on -> ['all'], else the names; a learning rate per encoder
    that differs from the first one's."""
    rows = dict(zip(TEXT_ENCODER_NAMES, zip(values[0::2], values[1::2])))
    mine = [name for name, _ in family_encoders(cfg.model.path)]
    on = [name for name in mine if rows[name][0]]
    covered = [name for name in mine if name in named_text_encoders(["all"], cfg.model.path)]
    cfg.network.text_encoders = ["all"] if on == covered and on else on
    rates = {name: float(rows[name][1] or 0.0) for name in mine}
    cfg.optimizer.text_encoder_lr = rates[mine[0]]
    cfg.optimizer.text_encoder_lrs = [f"{n}={r:g}" for n, r in rates.items() if r != rates[mine[0]]]


def values_to_config(values: list, runs_dir: str, encoders: list | None = None, settings=None
                     ) -> tuple[TrainConfig, dict[str, str]]:
    """A config from widget values (and the encoder rows' values, when given), plus every problem keyed by field:
    the complete check a run gets (the config and this machine), so the form refuses what the trainer would. With
    the app's settings, the cache lives in its data folder and images are read only from the folders it may read."""
    cfg, errors = TrainConfig(), {}
    cfg.saving.runs_dir = str(runs_dir)
    if settings is not None:
        cfg.dataset.cache_dir = str(settings.data_dir / ".loradesk-cache")
    for info, value in zip(form_fields(), values):
        if value is None and info.type in (int, float):
            errors[info.key] = f"{info.key} is empty; give a number"
            continue
        if info.type is list and isinstance(value, str):
            value = [line.strip() for line in value.splitlines() if line.strip()]  # one item per line, commas kept
        try:
            set_value(cfg, info.key, value)
        except ValueError as e:
            errors[info.key] = f"{info.key}: {e}"
    if encoders is not None:
        apply_encoder_values(cfg, encoders)
    if settings is not None:
        errors.update(unreadable_folders(cfg, settings.readable_dirs()))
    for problem in config_problems(cfg):
        if problem.startswith("saving.runs_dir"):  # the app's own folder: its server path stays on the server
            problem = ("The runs folder this app was started with cannot hold new runs (it is a file, or cannot be "
                       "written); whoever runs the app can start it with another --runs-dir.")
        key = problem_key(problem)
        if key in errors and problem not in errors[key]:
            errors[key] += "\n" + problem
        errors.setdefault(key, problem)
    return cfg, errors


def unreadable_folders(cfg: TrainConfig, roots) -> dict[str, str]:
    """The image folders of the form outside every folder the app may read (anyone who reaches the page could
    otherwise train on, and see samples of, any folder on the server)."""
    out = {}
    for key in READ_KEYS:
        path = str(get_value(cfg, key)).strip()
        if path and all(leaves_folder(path, root) for root in roots):
            out[key] = (f"{key}: {path} is not in a folder this app may read; add the images in the Dataset tab, or "
                        f"whoever runs the app can allow the folder with --allow-import DIR")
    return out


def problem_key(problem: str) -> str:
    """The form field a problem is about: the longest field key it starts with ('' for none)."""
    keys = [i.key for i in form_fields() if problem.startswith(i.key)]
    return max(keys, key=len) if keys else ""


# ----------------------------------------------------------------------------------------------------------------
# which network fields the form shows for the network it describes (issue 26: type, DoRA)

NETWORK_SWITCHES = ("network.type", "network.dora", "network.unet_targets")  # what changes which fields apply


def switched_fields() -> list[str]:
    """The network fields whose place in the form depends on the network: those some network does not read."""
    return [i.key for i in form_fields() if i.section == "network" and i.key not in NETWORK_SWITCHES
            and i.key not in network_fields_always_read()]


def network_fields_shown(cfg: TrainConfig, errors: dict[str, str] | None = None) -> dict[str, bool]:
    """switched_fields() -> shown: a field is shown where the network the form describes reads it (the engine's
    rule, trainer.network_fields_in_use), and always while it has a problem (a refused value stays in view)."""
    used = network_fields_in_use(cfg.network)
    return {key: key in (errors or {}) or key in used for key in switched_fields()}
