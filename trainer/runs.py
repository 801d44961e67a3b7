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

import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import config as C
from .events import Failed, Finished, Progress, Started, read_events


# ----------------------------------------------------------------------------------------------------------------
# atomic writes: a reader (or a Ctrl+C) never sees half a file

@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | Path, data) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=1))


def save_image_atomic(image, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


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


@contextmanager
def new_checkpoint_dir(run_dir: str | Path, step: int):
    """Yield a temporary folder to fill; it becomes checkpoints/step-<n> in one rename."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:06d}.", suffix=".tmp", dir=root))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


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
