"""The Train form <-> a TrainConfig: one widget per config field, generated from trainer.fields().

Two fields are not in the form because they live elsewhere: the trigger belongs to the dataset (the Dataset tab
saves it in the dataset folder, and the trainer reads it from there) and the runs folder is this app's setting.
"""
from __future__ import annotations

from trainer import FieldInfo, TrainConfig, config_problems, fields, get_value, set_value

ELSEWHERE = ("dataset.trigger", "saving.runs_dir")


def form_fields() -> list[FieldInfo]:
    return [info for info in fields() if info.key not in ELSEWHERE]


def config_to_values(cfg: TrainConfig) -> list:
    """Widget values for every form field, in form_fields() order (lists as one item per line)."""
    out = []
    for info in form_fields():
        value = get_value(cfg, info.key)
        out.append("\n".join(value) if info.type is list else value)
    return out


def values_to_config(values: list, runs_dir: str) -> tuple[TrainConfig, dict[str, str]]:
    """A config from widget values, plus every problem keyed by field: the complete check a run gets (the
    config and this machine), so the form refuses what the trainer would."""
    cfg, errors = TrainConfig(), {}
    cfg.saving.runs_dir = str(runs_dir)
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
    for problem in config_problems(cfg):
        key = problem_key(problem)
        if key in errors and problem not in errors[key]:
            errors[key] += "\n" + problem
        errors.setdefault(key, problem)
    return cfg, errors


def problem_key(problem: str) -> str:
    """The form field a problem is about: the longest field key it starts with ('' for none)."""
    keys = [i.key for i in form_fields() if problem.startswith(i.key)]
    return max(keys, key=len) if keys else ""
