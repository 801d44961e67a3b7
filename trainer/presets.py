"""Presets (sparse TOML files in presets/) and the config a form starts from.

A preset sets training settings. What belongs to the user's data (the dataset, its regularization folder, its
trigger, the sample prompts that show it) comes from a preset only when the user has no dataset yet, and every such
choice is said, never made silently. Stdlib only.
"""
from __future__ import annotations

from pathlib import Path

from . import config as C

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"
# keys a preset sets only together with its own dataset
DATASET_KEYS = ("dataset.path", "dataset.regularization_path", "dataset.trigger", "sampling.prompts")
# keys that belong to this installation, never to a preset
LOCAL_KEYS = ("saving.runs_dir",)


def list_presets(folder: str | Path = PRESETS_DIR) -> list[Path]:
    return sorted(Path(folder).glob("*.toml")) if Path(folder).is_dir() else []


def preset_note(path: Path) -> str:
    """A preset's first comment line, its one-line description."""
    first = path.read_text(encoding="utf-8").splitlines()[0] if path.stat().st_size else ""
    return first.lstrip("# ").strip() if first.startswith("#") else ""


def find_preset(name: str, folder: str | Path = PRESETS_DIR) -> Path:
    """A preset by file path or by name ("tiny-demo" -> presets/tiny-demo.toml)."""
    path = Path(name)
    if not path.exists() and (Path(folder) / f"{name}.toml").exists():
        path = Path(folder) / f"{name}.toml"
    return path


def load_preset(name: str, overrides: list[str] | None = None, folder: str | Path = PRESETS_DIR) -> C.TrainConfig:
    """A preset or config file over the defaults, then `section.key=value` overrides. A shipped preset's relative
    folders (examples/...) are found beside presets/ from any working directory."""
    path = find_preset(name, folder)
    cfg = C.load(path)
    if path.resolve().parent == Path(folder).resolve():
        C.find_folders_under(cfg, Path(folder).resolve().parent)
    return C.apply_overrides(cfg, overrides or [])


def resolve_config(name: str | None, overrides: list[str]) -> C.TrainConfig:
    """What `train --config NAME --set ...` trains: the preset or config file (or the defaults), the overrides, and
    the sampling values that follow the model's family wherever neither of them said otherwise, as picking the
    model in the app brings them (so a FLUX.1 dev run samples at 28 steps and guidance 3.5, not SD's 20 and 7.5)."""
    from .models.info import family_sample_defaults
    cfg = load_preset(name, overrides) if name is not None else C.apply_overrides(C.TrainConfig(), overrides)
    given = {o.split("=", 1)[0].strip() for o in overrides} | (_keys_in(find_preset(name)) if name else set())
    for key, value in family_sample_defaults(cfg.model.path).items():
        if key not in given:
            C.set_value(cfg, key, value)
    return cfg


def default_config(model_path: str = "", runs_dir: str = "runs") -> C.TrainConfig:
    """The defaults, with the settings that follow the base model (its native size; a short run on the tiny one)."""
    from .models.info import training_defaults
    cfg = C.TrainConfig()
    cfg.model.path, cfg.saving.runs_dir = model_path, str(runs_dir)
    for key, value in training_defaults(model_path).items():
        C.set_value(cfg, key, value)
    return cfg


def generation_defaults(model_path: str = "") -> dict[str, object]:
    """What generating starts from on a base model (the Generate tab, the CLI's generate): the sampling settings
    and image size its training samples use (default_config), so the same prompt and seed draw what a sample
    showed. Keys: steps, guidance, seed, negative_prompt, size."""
    cfg = default_config(model_path)
    s = cfg.sampling
    return {"steps": s.steps, "guidance": s.guidance, "seed": s.seed, "negative_prompt": s.negative_prompt,
            "size": cfg.dataset.resolution}


def apply_preset(current: C.TrainConfig, name: str, folder: str | Path = PRESETS_DIR,
                 filled: C.TrainConfig | None = None) -> tuple[C.TrainConfig, list[str]]:
    """The config after picking a preset while `current` is shown: the preset's training settings, the user's
    data kept. `filled`: what the form was filled in with (a running run's config, the defaults, an earlier
    preset); only the values of `current` that differ from it are the user's (None: every value it has). Returns
    the config and one note per user-facing choice that was kept, taken from the preset or cleared."""
    path = find_preset(name, folder)
    preset = load_preset(name, folder=folder)
    given = _keys_in(path)
    model, notes = _model_choice(current, preset, given)
    cfg = default_config(model, current.saving.runs_dir)
    for key in given - {"model.path", *LOCAL_KEYS}:
        C.set_value(cfg, key, C.get_value(preset, key))
    notes += _dataset_choice(cfg, current, preset, given, users_data(current, filled))
    return cfg, notes


def users_data(current: C.TrainConfig, filled: C.TrainConfig | None = None) -> list[str]:
    """The DATASET_KEYS the user chose: set, and (when `filled` is given) changed from what the form was filled
    in with. The trigger goes with the dataset: it is the user's only with a dataset of theirs."""
    def chose(key: str) -> bool:
        value = C.get_value(current, key)
        return bool(value) and (filled is None or value != C.get_value(filled, key))
    mine = [key for key in DATASET_KEYS if key != "dataset.trigger" and chose(key)]
    if "dataset.path" in mine and current.dataset.trigger:
        mine.append("dataset.trigger")
    return [key for key in DATASET_KEYS if key in mine]


def _model_choice(current: C.TrainConfig, preset: C.TrainConfig, given: set[str]) -> tuple[str, list[str]]:
    """The user's own base model stays; the built-in tiny one gives way to the model a preset is made for."""
    if "model.path" not in given or preset.model.path == current.model.path:
        return current.model.path, []
    if current.model.path.strip():
        return current.model.path, [f"Kept your base model; the preset was made for {preset.model.path}."]
    return preset.model.path, [f"The preset is made for the base model {preset.model.path}: set model.path to your "
                               f"copy of it."]


def _dataset_choice(cfg: C.TrainConfig, current: C.TrainConfig, preset: C.TrainConfig, given: set[str],
                    mine: list[str]) -> list[str]:
    """Keep the user's dataset and what they chose with it; with no dataset of theirs, take the preset's, saying
    so. What the form was filled in with and the user did not choose is not kept, and that is said too."""
    notes = []
    if "dataset.path" in mine:
        for key in DATASET_KEYS:  # the preset's folder, trigger and prompts belong to its own dataset
            C.set_value(cfg, key, C.get_value(current if key in mine else C.TrainConfig(), key))
        kept = [key for key in mine if key in given and C.get_value(preset, key) != C.get_value(current, key)]
        unused = [key for key in DATASET_KEYS if key in given and key not in mine and C.get_value(preset, key)
                  and C.get_value(preset, key) != C.get_value(current, key)]  # else it is said as not kept
        notes += [f"Kept your {_words(kept)}."] if kept else []
        if unused:
            notes.append(f"Not taken from the preset: its {_words(unused)} (they belong to its own dataset).")
    else:
        for key in mine:
            C.set_value(cfg, key, C.get_value(current, key))
        taken = [key for key in DATASET_KEYS if key in given and key not in mine]
        if taken:
            shown = ", ".join(f"{key} = {_shown(C.get_value(preset, key))}" for key in taken)
            notes.append(f"You have no dataset yet, so the preset's example is used: {shown}. Pick your dataset "
                         f"to train on it.")
    cleared = [key for key in DATASET_KEYS if key not in mine and C.get_value(current, key)
               and C.get_value(cfg, key) != C.get_value(current, key)]
    if cleared:
        notes.append(f"Not kept: the {_words(cleared)} the form was filled in with (not chosen for this run).")
    return notes


def _keys_in(path: Path) -> set[str]:
    """The section.key names a TOML file sets."""
    import tomllib
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    return {f"{section}.{key}" for section, values in data.items() if isinstance(values, dict) for key in values}


def _words(keys: list[str]) -> str:
    names = {"dataset.path": "dataset", "dataset.regularization_path": "regularization folder",
             "dataset.trigger": "trigger", "sampling.prompts": "sample prompts"}
    words = [names[k] for k in keys]
    return ", ".join(words[:-1]) + " and " + words[-1] if len(words) > 1 else words[0]


def _shown(value) -> str:
    if isinstance(value, list):
        return "; ".join(value)
    return Path(value).name if "/" in str(value) else str(value)
