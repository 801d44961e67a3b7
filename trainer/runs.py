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
import dataclasses
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import config as C
from .advice import advice_for
from .atomic import atomic_dir, clean_leftovers, write_json_atomic, write_text_atomic
from .errors import UserError
from .events import Failed, Finished, Progress, Started, Validation, tail_events
from .runlock import is_held, pid_alive
from .threads import pick_cpu_threads

CHECKPOINT_ADAPTER = "adapter.safetensors"  # in checkpoints/step-<n>/: what exports, blends and the app use
TRAINING_STATE = "state.json"  # its presence marks a complete checkpoint folder
MANIFEST = "manifest.json"  # each file's size and sha256, written last: resume trusts only what verifies
REQUIRED_FILES = ("lora.safetensors", "optimizer.safetensors", TRAINING_STATE)


# ----------------------------------------------------------------------------------------------------------------
# run folders

def create_run_dir(cfg: C.TrainConfig) -> Path:
    """A fresh run folder holding the resolved config (see resolved_config). mkdir is the claim: two runs started
    in the same second (two processes) each get their own folder."""
    cfg = resolved_config(cfg)
    root = Path(cfg.saving.runs_dir)
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 10_000):
        run_dir = root / (f"{cfg.run.name}-{stamp}" + (f"-{n}" if n > 1 else ""))
        try:
            run_dir.mkdir()
        except FileExistsError:
            continue
        try:
            write_text_atomic(run_dir / "config.toml", C.dumps(cfg))
        except BaseException:  # a full disk, a Ctrl+C: no folder without its config is left (a kill: see unstarted)
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        return run_dir
    raise UserError(f"{root} holds 10,000 runs named {cfg.run.name}-{stamp}; give the run another name")


def runs_dir_problems(runs_dir: str) -> list[str]:
    """Why no run folder can be created under runs_dir (empty when one can): a file where a folder is needed, or
    a folder that cannot be written (a read-only file system, no permission). Checked before a run starts, so
    validate and the app's Check refuse what creating the run folder would."""
    path = C.expand_path(runs_dir or ".").absolute()
    here = path
    while not here.exists() and here.parent != here:  # the folder runs_dir would be created in
        here = here.parent
    if not here.is_dir():
        return [f"saving.runs_dir {runs_dir}: {here} is a file, not a folder; choose another saving.runs_dir, or "
                f"move the file away"]
    if not os.access(here, os.W_OK | os.X_OK):
        return [f"saving.runs_dir {runs_dir}: {here} cannot be written (a read-only disk, or not yours); choose a "
                f"folder you can write for saving.runs_dir"]
    return []


def resolved_config(cfg: C.TrainConfig) -> C.TrainConfig:
    """A copy of cfg as a run records it: absolute local folders (the trainer may run in another working folder),
    the trigger it will use (dataset.trigger, else the dataset folder's own) and its CPU thread count."""
    from .data.captions import resolve_trigger
    cfg = copy.deepcopy(cfg)
    for key in ("dataset.path", "dataset.regularization_path", "validation.path", "saving.runs_dir"):
        value = C.get_value(cfg, key).strip()
        if value:
            C.set_value(cfg, key, str(C.expand_path(value).resolve()))
    if cfg.model.path.strip() and C.expand_path(cfg.model.path).exists():
        cfg.model.path = str(C.expand_path(cfg.model.path).resolve())
    cfg.dataset.trigger = resolve_trigger(cfg.dataset)
    if cfg.precision.cpu_threads == 0:  # picked once, now, and kept for every resume (threads.py says why)
        cfg.precision.cpu_threads = pick_cpu_threads()
    return cfg


def load_run_config(run_dir: str | Path, clean: bool = False) -> C.TrainConfig:
    """The run's resolved config. `clean`: a folder killed while it was created is removed (resume asks so; a
    reader such as the live view never removes one: it may be being created this very moment)."""
    path = Path(run_dir) / "config.toml"
    if not path.is_file() and unstarted(run_dir):
        if clean:
            discard_unstarted(run_dir)
        raise NeverStarted(f"{run_dir} was interrupted while it was created, so that run never started (nothing "
                           f"was trained{'; the folder is removed' if clean else ''}); start it again: python -m "
                           f"trainer train --config ... (the config and --set you started it with)")
    if not path.is_file():
        raise C.ConfigError([f"{run_dir} has no config.toml, so it is not a loradesk run folder; give a folder "
                             f"under your runs directory"], str(run_dir))
    return C.load(path)


class NeverStarted(C.ConfigError):
    """A run folder without a config because it was killed while it was created: one line, not a config list."""

    def __init__(self, message: str):
        self.problems, self.source = [message], None
        UserError.__init__(self, message)


def unstarted(folder: str | Path) -> bool:
    """A run folder killed inside create_run_dir: no config.toml, nothing in it but the config's temporary file
    (or nothing at all, with a run folder's name)."""
    import re
    folder = Path(folder)
    try:
        names = [p.name for p in folder.iterdir()]
    except OSError:
        return False
    if (folder / "config.toml").exists() or not all(re.fullmatch(r"\.config\.toml\..+\.tmp", n) for n in names):
        return False
    return bool(names) or re.search(r"-\d{8}-\d{6}(-\d+)?$", folder.name) is not None


def discard_unstarted(folder: str | Path) -> None:
    """Remove an unstarted run folder (it holds nothing the user made: at most our temporary file)."""
    clean_leftovers(folder)
    try:
        Path(folder).rmdir()
    except OSError:
        pass  # something appeared in it meanwhile: keep it


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


@contextmanager
def new_checkpoint_dir(run_dir: str | Path, step: int):
    """A context yielding a temporary folder to fill; sealed with a manifest (each file's size and sha256), it
    becomes checkpoints/step-<n> in one rename once every file is on disk (atomic_dir fsyncs them)."""
    from .data.cache import file_sha256
    with atomic_dir(Path(run_dir) / "checkpoints" / f"step-{step:06d}") as tmp:
        yield tmp
        write_json_atomic(tmp / MANIFEST, {p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)}
                                           for p in sorted(tmp.iterdir()) if p.is_file()})


def checkpoint_problem(checkpoint: str | Path) -> str:
    """Why a checkpoint folder cannot be trusted ("" when it verifies): a file missing, or not the size and hash
    its manifest recorded. A checkpoint of an older loradesk (no manifest) is checked by parsing its files."""
    from .data.cache import file_sha256
    folder = Path(checkpoint)
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return _parse_problem(folder)
    except (OSError, ValueError):
        return "its manifest.json is damaged"
    for name in REQUIRED_FILES:
        if name not in manifest:
            return f"its manifest does not list {name}"
    if not isinstance(manifest, dict) or not all(isinstance(v, dict) and Path(k).name == k and k not in ("", ".", "..")
                                                  for k, v in manifest.items()):
        return "its manifest.json is damaged"
    for name, want in manifest.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want.get("size") or file_sha256(path) != want.get("sha256"):
            return f"{name} is damaged (not the size or content that was written)"
    return ""


def unverified_warning(checkpoint: str | Path) -> str:
    """What to tell when resuming from a checkpoint without its manifest.json ("" with one): its files could only
    be parsed, not checked against what was written (it was deleted, or an older loradesk wrote the checkpoint)."""
    folder = Path(checkpoint)
    if (folder / MANIFEST).is_file():
        return ""
    return (f"checkpoint {folder.name} has no {MANIFEST}, so its files could not be verified against what was "
            f"written (they parse); resumed from it anyway: if the run goes wrong, resume from an older checkpoint "
            f"(move {folder.name} aside)")


def _parse_problem(folder: Path) -> str:
    from safetensors import safe_open
    for name in REQUIRED_FILES:
        path = folder / name
        try:
            if name.endswith(".json"):
                json.loads(path.read_text(encoding="utf-8"))
            else:
                with safe_open(str(path), "pt"):
                    pass
        except FileNotFoundError:
            return f"{name} is missing"
        except Exception:  # safetensors raises its own error types
            return f"{name} is damaged (it cannot be read)"
    return ""


def resumable_checkpoint(run_dir: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint that verifies, and the newer ones skipped with the reason."""
    skipped = []
    for checkpoint in reversed(checkpoint_dirs(run_dir)):
        problem = checkpoint_problem(checkpoint)
        if not problem:
            return checkpoint, skipped
        skipped.append((checkpoint, problem))
    return None, skipped


def prune_checkpoints(run_dir: str | Path, keep_last: int, keep: int | None = None) -> None:
    """Delete all but the newest keep_last checkpoints, and the one at step `keep` (the best one)."""
    for old in checkpoint_dirs(run_dir)[:-keep_last]:
        if _checkpoint_step(old.name) != keep:
            shutil.rmtree(old, ignore_errors=True)


def begin_attempt(run_dir: str | Path) -> None:
    """Ready a run folder for a new attempt (a start or a resume), before the trainer process exists: commands of
    an earlier attempt are dropped, so every command sent from now on counts (the trainer reads commands.jsonl
    from its start); temporary files of killed runs are removed, and a checkpoint caught between the two renames
    of a swap (only its .old copy complete) is put back."""
    run_dir = Path(run_dir)
    (run_dir / "commands.jsonl").unlink(missing_ok=True)
    for folder in (run_dir, run_dir / "samples", run_dir / "checkpoints"):
        clean_leftovers(folder)


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
    best_step: int | None = None  # the checkpoint with the lowest validation loss (None without validation)
    best_loss: float | None = None


def _trains_now(held: bool | None, pid: int) -> bool:
    """The trainer's file lock says it (see runlock); only where the OS has no flock, the recorded PID."""
    return pid_alive(pid) if held is None else held


FINAL_STATES = ("finished", "stopped", "failed")
_final_infos: dict[Path, tuple[int, RunInfo]] = {}  # run folder -> (events read, its final RunInfo)


def run_info(run_dir: str | Path) -> RunInfo:
    """State of a run folder: the last Started event decides which attempt (resume) we look at. The events are
    tailed, and a finished run's state is kept until its events.jsonl grows, so polling every run each second
    (every browser tab does) costs only the new lines."""
    run_dir = Path(run_dir)
    held = is_held(run_dir)  # before the events: a trainer that writes its last event and exits in between is
    events = tail_events(run_dir / "events.jsonl")  # then seen finished, not "killed" (the lock is already gone)
    cached = _final_infos.get(run_dir)
    if cached and cached[0] == len(events) and not held:
        return cached[1]
    info = _info_from_events(run_dir, events, held)
    best = best_checkpoint(run_dir, events)
    if best is not None:
        info.best_loss, info.best_step = best
    if held and info.state != "running":  # a resumed trainer still loading (its Started is not written yet), or
        info = dataclasses.replace(info, state="running", error="", advice="")  # one writing its last files
    if not info.advice and info.error:
        info.advice = advice_for(info.error)
    if info.state in FINAL_STATES and events:
        _final_infos[run_dir] = (len(events), info)
    return info


def _info_from_events(run_dir: Path, events: list, held: bool | None) -> RunInfo:
    name = run_dir.name
    try:
        name = load_run_config(run_dir).run.name
    except C.ConfigError:
        pass
    starts = [i for i, e in enumerate(events) if isinstance(e, Started)]
    info = RunInfo(run_dir, name, "failed", 0, 0, None, run_dir.stat().st_mtime)
    if not starts and any(isinstance(e, Finished) for e in events):  # Ctrl+C while the model loaded
        info.state = "stopped"
        return info
    if not starts:
        failures = [e for e in events if isinstance(e, Failed)]  # a config, data or model error before step 0
        info.error = failures[-1].error if failures else "the run never started (see train.log)"
        if failures:
            info.advice = failures[-1].advice
            return info
        if held or (held is None and (run_dir / "train.log").exists()
                    and time.time() - run_dir.stat().st_mtime < 120):
            info.state = "running"  # still loading
        return info
    attempt = events[starts[-1]:]
    first = attempt[0]
    info.started_at, info.total_steps, info.step = events[starts[0]].time, first.total_steps, first.start_step
    failure = None
    for e in attempt:
        if isinstance(e, Progress):
            info.step, info.last_loss = e.step, e.loss
        elif isinstance(e, Finished):  # the end, even after a launcher's Failed: torchrun was killed while its
            info.state = "stopped" if e.stopped else "finished"  # processes went on to stop with an adapter
            info.adapter_path = Path(e.adapter_path) if e.adapter_path else None  # "": stopped before a step
            info.step = e.step
            return info
        elif isinstance(e, Failed):
            failure = failure or e
    if failure is not None:
        info.error, info.advice = failure.error, failure.advice
        return info
    if _trains_now(held, first.pid):
        info.state = "running"
    else:
        info.error = "the training process ended without a final event (killed or crashed); it can be resumed"
    return info


def list_runs(runs_dir: str | Path) -> list[RunInfo]:
    """Every run folder under runs_dir, newest first."""
    root = C.expand_path(runs_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and is_run_dir(p):
            found.append(run_info(p))
        elif p.is_dir() and unstarted(p) and time.time() - p.stat().st_mtime > UNSTARTED_AFTER_S:
            discard_unstarted(p)  # killed while it was created (a younger one may be being created right now)
    return sorted(found, key=lambda r: r.started_at, reverse=True)


UNSTARTED_AFTER_S = 600  # creating a run folder takes milliseconds; one without its config this old was killed


def running_run(runs_dir: str | Path) -> RunInfo | None:
    """The run under runs_dir whose trainer process is alive, if any (one device, one job)."""
    return next((info for info in list_runs(runs_dir) if info.state == "running"), None)


class Ema:
    """TensorBoard's smoothing of a noisy curve, one value at a time: an exponential moving average, debiased so
    the first points are not pulled towards 0 (most of a diffusion loss's noise is the random timestep)."""

    def __init__(self, weight: float = 0.9):
        self.weight, self.last, self.n = weight, 0.0, 0

    def add(self, value: float) -> float:
        self.n += 1
        self.last = self.weight * self.last + (1 - self.weight) * value
        return self.last / (1 - self.weight ** self.n)


def smoothed(values: list[float], weight: float = 0.9) -> list[float]:
    """Ema over a whole curve (the live view's smoothed loss)."""
    ema = Ema(weight)
    return [ema.add(v) for v in values]


def run_checkpoint(run_dir: str | Path, step: str) -> Path:
    """The checkpoint folder of a run at a step ('best': the lowest validation loss), or a UserError naming why."""
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise UserError(f"--step needs a run folder; {run_dir} is not one")
    if step == "best":
        best = best_checkpoint(run_dir)
        if best is None:
            raise UserError(f"run {run_dir.name} has no validation loss, so no best checkpoint: train with "
                            f"validation.split or validation.path")
        step = str(best[1])
    if not step.isdigit():
        raise UserError(f"--step must be a step number or 'best', not {step!r}")
    found = {_checkpoint_step(p.name): p for p in checkpoint_dirs(run_dir)}
    if int(step) not in found:
        have = ", ".join(str(n) for n in sorted(found)) or "none"
        raise UserError(f"run {run_dir.name} has no checkpoint at step {step} (it has: {have})")
    return found[int(step)]


def validation_losses(run_dir: str | Path, events: list | None = None) -> dict[int, float]:
    """step -> validation loss, from the run's events (a resumed run's later value for a step wins)."""
    events = tail_events(Path(run_dir) / "events.jsonl") if events is None else events
    return {e.step: e.loss for e in events if isinstance(e, Validation)}


def best_checkpoint(run_dir: str | Path, events: list | None = None) -> tuple[float, int] | None:
    """(loss, step) of the existing checkpoint with the lowest validation loss; None without validation."""
    losses = validation_losses(run_dir, events)
    scored = [(losses[step], step) for step in (_checkpoint_step(p.name) for p in checkpoint_dirs(run_dir))
              if step in losses]
    return min(scored) if scored else None
