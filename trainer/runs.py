"""The run folder: resolved config, events, samples, checkpoints, final adapter; atomic writes; resume state.

runs/<name>-<YYYYmmdd-HHMMSS>/
  config.toml          the resolved config (every value, not only the preset's)
  events.jsonl         one JSON event a line (trainer.events)
  commands.jsonl       stop / save / sample requests from any process
  train.log            the child process's output when started by trainer.job
  samples/             step-<n>-<i>.png
  checkpoints/step-<n>/  lora.safetensors, adapter.safetensors, optimizer.safetensors, state.json
  <name>.safetensors   the final adapter
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from . import config as C
# the atomic writers live in trainer.atomic; re-exported because the loop, the app and tests import them from here
from .atomic import atomic_dir, atomic_path, save_image_atomic, write_json_atomic, write_text_atomic  # noqa: F401
from .events import Failed, Finished, Progress, Started, read_events


# ----------------------------------------------------------------------------------------------------------------
# run folders

def create_run_dir(cfg: C.TrainConfig) -> Path:
    """A fresh run folder holding the resolved config."""
    root = Path(cfg.saving.runs_dir).expanduser()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = root / f"{cfg.run.name}-{stamp}"
    n = 2
    while run_dir.exists():
        run_dir = root / f"{cfg.run.name}-{stamp}-{n}"
        n += 1
    run_dir.mkdir(parents=True)
    write_text_atomic(run_dir / "config.toml", C.dumps(cfg))
    return run_dir


def load_run_config(run_dir: str | Path) -> C.TrainConfig:
    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        raise C.ConfigError([f"{run_dir} has no config.toml, so it is not a loradesk run folder; give a folder "
                             f"under your runs directory"], str(run_dir))
    return C.load(path)


def final_adapter_path(run_dir: str | Path, cfg: C.TrainConfig) -> Path:
    return Path(run_dir) / f"{cfg.run.name}.safetensors"


# ----------------------------------------------------------------------------------------------------------------
# checkpoints

def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints (a half-written one keeps its .tmp name and is ignored), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "state.json").exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


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


def run_info(run_dir: str | Path) -> RunInfo:
    """State of a run folder: the last Started event decides which attempt (resume) we look at."""
    run_dir = Path(run_dir)
    events = read_events(run_dir / "events.jsonl")
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
    root = Path(runs_dir).expanduser()
    if not root.is_dir():
        return []
    runs = [run_info(p) for p in root.iterdir() if p.is_dir() and (p / "config.toml").exists()]
    return sorted(runs, key=lambda r: r.started_at, reverse=True)
