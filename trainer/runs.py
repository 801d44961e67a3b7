"""The run folder: resolved config, events, samples, checkpoints, final adapter; atomic writes; resume state.

runs/<name>-<YYYYmmdd-HHMMSS>/
  config.toml          the resolved config (every value, not only the preset's)
  events.jsonl         one JSON event a line (trainer.events)
  commands.jsonl       stop / save / sample requests from any process
  train.log            the child process's output when started by trainer.job
  samples/             step-<n>-<i>.png
  checkpoints/step-<n>/  adapter.safetensors (the adapter, kohya layout with alpha), lora.safetensors (the
                       trainable tensors by peft name, no alpha: training state only), optimizer.safetensors,
                       state.json
  <name>.safetensors   the final adapter

`adapter_file()` is the one rule for which file of a run, a checkpoint or a path is *the adapter*.
"""
from __future__ import annotations

import copy
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from . import config as C
from .advice import advice_for
from .atomic import atomic_dir, write_text_atomic
from .errors import UserError
from .events import Failed, Finished, Progress, Started, tail_events

CHECKPOINT_ADAPTER = "adapter.safetensors"  # in checkpoints/step-<n>/: what exports, blends and the app use
TRAINING_STATE = "state.json"  # its presence marks a complete checkpoint folder


# ----------------------------------------------------------------------------------------------------------------
# run folders

def create_run_dir(cfg: C.TrainConfig) -> Path:
    """A fresh run folder holding the resolved config (see resolved_config)."""
    cfg = resolved_config(cfg)
    root = Path(cfg.saving.runs_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = root / f"{cfg.run.name}-{stamp}"
    n = 2
    while run_dir.exists():
        run_dir = root / f"{cfg.run.name}-{stamp}-{n}"
        n += 1
    run_dir.mkdir(parents=True)
    write_text_atomic(run_dir / "config.toml", C.dumps(cfg))
    return run_dir


def resolved_config(cfg: C.TrainConfig) -> C.TrainConfig:
    """A copy of cfg as a run records it: absolute local folders (the trainer may run in another working folder)
    and the trigger it will use (dataset.trigger, else the dataset folder's own)."""
    from .data.captions import resolve_trigger
    cfg = copy.deepcopy(cfg)
    for key in ("dataset.path", "dataset.regularization_path", "saving.runs_dir"):
        value = C.get_value(cfg, key).strip()
        if value:
            C.set_value(cfg, key, str(C.expand_path(value).resolve()))
    if cfg.model.path.strip() and C.expand_path(cfg.model.path).exists():
        cfg.model.path = str(C.expand_path(cfg.model.path).resolve())
    cfg.dataset.trigger = resolve_trigger(cfg.dataset)
    return cfg


def load_run_config(run_dir: str | Path) -> C.TrainConfig:
    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        raise C.ConfigError([f"{run_dir} has no config.toml, so it is not a loradesk run folder; give a folder "
                             f"under your runs directory"], str(run_dir))
    return C.load(path)


def final_adapter_path(run_dir: str | Path, cfg: C.TrainConfig) -> Path:
    return Path(run_dir) / f"{cfg.run.name}.safetensors"


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / "config.toml").is_file()


def is_checkpoint_dir(path: str | Path) -> bool:
    return (Path(path) / TRAINING_STATE).is_file() or (Path(path) / CHECKPOINT_ADAPTER).is_file()


def checkpoint_adapter(checkpoint: str | Path) -> Path:
    """The adapter of one checkpoint: the kohya file with per-layer alpha, read at its trained strength
    (its lora.safetensors is training state, peft names and no alpha, and would be read at scale 1)."""
    return Path(checkpoint) / CHECKPOINT_ADAPTER


def adapter_file(source: str | Path) -> Path:
    """The adapter file `source` stands for: an adapter file itself, a checkpoint folder's adapter, or a run
    folder's final adapter (its newest checkpoint's when the run has no final adapter yet)."""
    path = C.expand_path(source)
    if path.is_file():
        return path
    if not path.is_dir():
        raise UserError(f"{source} does not exist; give an adapter .safetensors file, a checkpoint folder "
                        f"(runs/<run>/checkpoints/step-N) or a run folder")
    if is_checkpoint_dir(path):
        if not checkpoint_adapter(path).is_file():
            raise UserError(f"checkpoint {path} has no {CHECKPOINT_ADAPTER}; it was written by an older loradesk "
                            f"or is damaged: use another checkpoint")
        return checkpoint_adapter(path)
    if is_run_dir(path):
        return _run_adapter(path)
    raise UserError(f"{source} is a folder but neither a run folder (with config.toml) nor a checkpoint folder; "
                    f"give an adapter .safetensors file")


def checkpoint_step(adapter: str | Path) -> int | None:
    """The step of the checkpoint an adapter file belongs to; None for any other file (a final adapter)."""
    path = Path(adapter)
    if path.name != CHECKPOINT_ADAPTER or path.parent.parent.name != "checkpoints":
        return None
    return _checkpoint_step(path.parent.name)


def run_model_index(source: str | Path) -> dict | None:
    """The module index of the base model a run (or a checkpoint or final adapter inside one) trained on, from
    its config files; None for anything else, or when that model's configs are not at hand."""
    path = Path(source).resolve()
    run_dir = next((p for p in (path, *path.parents) if is_run_dir(p)), None)
    if run_dir is None:
        return None
    from .models import model_index
    try:
        return model_index(load_run_config(run_dir).model.path)
    except (OSError, ValueError, C.ConfigError):
        return None


def _run_adapter(run_dir: Path) -> Path:
    final = final_adapter_path(run_dir, load_run_config(run_dir))
    if final.is_file():
        return final
    last = last_checkpoint(run_dir)
    if last is None or not checkpoint_adapter(last).is_file():
        raise UserError(f"run {run_dir.name} has no adapter yet: wait for its first checkpoint, or for its end")
    return checkpoint_adapter(last)


# ----------------------------------------------------------------------------------------------------------------
# checkpoints

def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints (a half-written one keeps its .tmp name and is ignored), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _checkpoint_step(p.name) is not None
             and (p / TRAINING_STATE).exists()]
    return sorted(found, key=lambda p: _checkpoint_step(p.name))


def _checkpoint_step(name: str) -> int | None:
    """n for a folder named step-<n>; None for any other name (a copy the user made, a temporary folder)."""
    head, _, number = name.partition("-")
    return int(number) if head == "step" and number.isdigit() else None


def last_checkpoint(run_dir: str | Path) -> Path | None:
    found = checkpoint_dirs(run_dir)
    return found[-1] if found else None


def new_checkpoint_dir(run_dir: str | Path, step: int):
    """A context yielding a temporary folder to fill; it becomes checkpoints/step-<n> in one rename."""
    return atomic_dir(Path(run_dir) / "checkpoints" / f"step-{step:06d}")


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    for old in checkpoint_dirs(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# run state, read back from events.jsonl (works across app restarts and for several browser tabs)

@dataclass
class RunInfo:
    run_dir: Path
    name: str
    state: str  # running | finished | stopped | failed
    step: int
    total_steps: int
    adapter_path: Path | None
    started_at: float
    error: str = ""
    advice: str = ""
    last_loss: float | None = None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child has exited but is still in the table
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return True


FINAL_STATES = ("finished", "stopped", "failed")
_final_infos: dict[Path, tuple[int, RunInfo]] = {}  # run folder -> (events read, its final RunInfo)


def run_info(run_dir: str | Path) -> RunInfo:
    """State of a run folder: the last Started event decides which attempt (resume) we look at. The events are
    tailed, and a finished run's state is kept until its events.jsonl grows, so polling every run each second
    (every browser tab does) costs only the new lines."""
    run_dir = Path(run_dir)
    events = tail_events(run_dir / "events.jsonl")
    cached = _final_infos.get(run_dir)
    if cached and cached[0] == len(events):
        return cached[1]
    info = _info_from_events(run_dir, events)
    if not info.advice and info.error:
        info.advice = advice_for(info.error)
    if info.state in FINAL_STATES and events:
        _final_infos[run_dir] = (len(events), info)
    return info


def _info_from_events(run_dir: Path, events: list) -> RunInfo:
    name = run_dir.name
    try:
        name = load_run_config(run_dir).run.name
    except C.ConfigError:
        pass
    starts = [i for i, e in enumerate(events) if isinstance(e, Started)]
    info = RunInfo(run_dir, name, "failed", 0, 0, None, run_dir.stat().st_mtime)
    if not starts:
        failures = [e for e in events if isinstance(e, Failed)]  # a config, data or model error before step 0
        info.error = failures[-1].error if failures else "the run never started (see train.log)"
        if failures:
            info.advice = failures[-1].advice
            return info
        if (run_dir / "train.log").exists() and time.time() - run_dir.stat().st_mtime < 120:
            info.state = "running"  # still loading
        return info
    attempt = events[starts[-1]:]
    first = attempt[0]
    info.started_at, info.total_steps, info.step = events[starts[0]].time, first.total_steps, first.start_step
    for e in attempt:
        if isinstance(e, Progress):
            info.step, info.last_loss = e.step, e.loss
        elif isinstance(e, Finished):
            info.state = "stopped" if e.stopped else "finished"
            info.adapter_path = Path(e.adapter_path)
            info.step = e.step
            return info
        elif isinstance(e, Failed):
            info.error, info.advice = e.error, e.advice
            return info
    if _pid_alive(first.pid):
        info.state = "running"
    else:
        info.error = "the training process ended without a final event (killed or crashed); it can be resumed"
    return info


def list_runs(runs_dir: str | Path) -> list[RunInfo]:
    """Every run folder under runs_dir, newest first."""
    root = C.expand_path(runs_dir)
    if not root.is_dir():
        return []
    found = [run_info(p) for p in root.iterdir() if p.is_dir() and is_run_dir(p)]
    return sorted(found, key=lambda r: r.started_at, reverse=True)


def running_run(runs_dir: str | Path) -> RunInfo | None:
    """The run under runs_dir whose trainer process is alive, if any (one device, one job)."""
    return next((info for info in list_runs(runs_dir) if info.state == "running"), None)


def smoothed(values: list[float], weight: float = 0.9) -> list[float]:
    """TensorBoard's smoothing of a noisy curve: an exponential moving average, debiased so the first points are
    not pulled towards 0 (most of a diffusion loss's noise is the random timestep, so the raw points say little)."""
    out, last = [], 0.0
    for n, value in enumerate(values, start=1):
        last = weight * last + (1 - weight) * value
        out.append(last / (1 - weight ** n))
    return out
