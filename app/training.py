"""The Train tab's logic: the form generated from trainer.config.fields(), starting runs, reading their state.

Every run's state is read from its run folder (events.jsonl), never kept per browser session, so several tabs and
a restarted app all see the same thing.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from trainer import config as C
from trainer.events import (CheckpointWritten, Event, Failed, Finished, Message, Progress, SampleWritten, Started,
                            event_from_dict)

from .settings import AppSettings

OOM_ADVICE = ("Out of memory: lower dataset.batch_size or dataset.resolution, turn on "
              "precision.gradient_checkpointing, and keep dataset.cache_latents on.")


class AppError(RuntimeError):
    """Something the user asked for that cannot be done now; the message says why and what to do."""


# ----------------------------------------------------------------------------------------------------------------
# the form: one widget per config field, in fields() order

def form_fields() -> list[C.FieldInfo]:
    return C.fields()


def config_to_values(cfg: C.TrainConfig) -> list:
    """Widget values for every field, in form_fields() order (lists as one item per line)."""
    out = []
    for info in form_fields():
        value = C.get_value(cfg, info.key)
        out.append("\n".join(value) if info.type is list else value)
    return out


def values_to_config(values: list) -> tuple[C.TrainConfig, dict[str, str]]:
    """A config from widget values, plus every problem keyed by field (validate()'s messages start with the key)."""
    cfg, errors = C.TrainConfig(), {}
    for info, value in zip(form_fields(), values):
        if value is None and info.type in (int, float):
            errors[info.key] = f"{info.key} is empty; give a number"
            continue
        try:
            C.set_value(cfg, info.key, value)
        except ValueError as e:
            errors[info.key] = f"{info.key}: {e}"
    for problem in C.validate(cfg):
        key = problem_key(problem)
        if key in errors and problem not in errors[key]:
            errors[key] += "\n" + problem
        errors.setdefault(key, problem)
    return cfg, errors


def problem_key(problem: str) -> str:
    """The field a validate() message is about: the longest field key it starts with ('' for none)."""
    keys = [i.key for i in form_fields() if problem.startswith(i.key)]
    return max(keys, key=len) if keys else ""


def default_config(settings: AppSettings) -> C.TrainConfig:
    cfg = C.TrainConfig()
    cfg.model.path = settings.base_model
    cfg.saving.runs_dir = str(settings.runs_dir)
    return cfg


def list_presets(settings: AppSettings) -> list[str]:
    folder = Path(settings.presets_dir)
    return sorted(p.stem for p in folder.glob("*.toml")) if folder.is_dir() else []


def load_preset(settings: AppSettings, name: str, dataset_path: str = "") -> C.TrainConfig:
    """A preset over the defaults, with this app's base model, runs folder and dataset kept."""
    cfg = C.load(Path(settings.presets_dir) / f"{name}.toml")
    if not cfg.model.path:
        cfg.model.path = settings.base_model
    cfg.saving.runs_dir = str(settings.runs_dir)
    C.find_folders_under(cfg, Path(settings.presets_dir).resolve().parent)  # examples/... beside presets/
    if dataset_path:
        cfg.dataset.path = dataset_path
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# starting and steering runs

_jobs: dict[Path, object] = {}  # Jobs this process started, polled so finished children are reaped
_start_lock = threading.Lock()


def active_run(settings: AppSettings) -> Path | None:
    """The run folder whose trainer process is alive (one device, one job); trainer.job.active_job's rule, over
    the cached infos below."""
    for run_dir, job in list(_jobs.items()):
        if not job.is_alive():  # poll() reaps the child so it is not left a zombie
            _jobs.pop(run_dir, None)
    running = [info for info in list_runs(settings) if info.state == "running"]
    return running[0].run_dir if running else None


_infos: dict[Path, tuple[tuple, object]] = {}
FINAL_STATES = ("finished", "stopped", "failed")


def run_info(run_dir: Path):
    """trainer.runs.run_info, reused while a finished run's events.jsonl is unchanged: every browser tab polls each
    second, and re-parsing every old run's events each time would grow with the history."""
    from trainer.runs import run_info as read_info
    events = Path(run_dir) / "events.jsonl"
    stamp = (events.stat().st_mtime_ns, events.stat().st_size) if events.exists() else None
    cached = _infos.get(Path(run_dir))
    if cached and stamp and cached[0] == stamp:
        return cached[1]
    info = read_info(run_dir)
    if stamp and info.state in FINAL_STATES:  # a running run's state also depends on its process: not cached
        _infos[Path(run_dir)] = (stamp, info)
    return info


def list_runs(settings: AppSettings) -> list:
    """Every run under the runs folder, newest first (trainer.runs.list_runs over the cache above)."""
    root = Path(settings.runs_dir).expanduser()
    if not root.is_dir():
        return []
    found = [run_info(p) for p in root.iterdir() if p.is_dir() and (p / "config.toml").exists()]
    return sorted(found, key=lambda r: r.started_at, reverse=True)


def start_run(settings: AppSettings, cfg: C.TrainConfig) -> Path:
    """Validate and start a training in its own process; refuses while another run or a generation is going."""
    cfg.saving.runs_dir = str(settings.runs_dir)
    _absolute_paths(cfg)
    return _launch(settings, cfg, None)


def resume_run(settings: AppSettings, run_dir: Path) -> Path:
    """Continue a stopped or crashed run from its last checkpoint."""
    from trainer.runs import load_run_config
    try:
        cfg = load_run_config(run_dir)
    except C.ConfigError as e:
        raise AppError(str(e)) from None
    return _launch(settings, cfg, Path(run_dir))


def _launch(settings: AppSettings, cfg: C.TrainConfig, resume: Path | None) -> Path:
    from trainer.job import JobError, start_job

    from . import generation
    with _start_lock:
        busy = active_run(settings)
        if busy is not None:
            raise AppError(f"Run {busy.name} is still training. Stop it first: one device runs one job at a time.")
        if not generation.hold_device():
            raise AppError("Images are being generated; press Start again when they are done (one device, one job).")
        try:
            generation.release_models()  # the training gets the device memory the Generate tab held
            job = start_job(cfg, resume=resume, env=child_env())
        except (JobError, C.ConfigError) as e:
            raise AppError(str(e)) from None
        finally:
            generation.free_device()
        _jobs[job.run_dir] = job
        return job.run_dir


def child_env() -> dict:
    """The child runs `python -m trainer`: make this trainer package importable from any working folder."""
    import trainer
    root = str(Path(trainer.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def _absolute_paths(cfg: C.TrainConfig) -> None:
    """The child process may run elsewhere: give it absolute local paths."""
    if cfg.dataset.path:
        cfg.dataset.path = str(Path(cfg.dataset.path).expanduser().resolve())
    if cfg.dataset.regularization_path.strip():
        cfg.dataset.regularization_path = str(Path(cfg.dataset.regularization_path).expanduser().resolve())
    if cfg.model.path and Path(cfg.model.path).expanduser().exists():
        cfg.model.path = str(Path(cfg.model.path).expanduser().resolve())


def send(run_dir: Path | None, command: str) -> str:
    """stop / save / sample through the run folder, so a run started before an app restart obeys too."""
    from trainer.events import send_command
    if run_dir is None:
        raise AppError("No run is training now.")
    send_command(run_dir, command)
    return {"stop": "Stopping after the current step; the adapter so far will be saved.",
            "save": "A checkpoint will be written after the current step.",
            "sample": "Samples will be rendered after the current step."}[command]


# ----------------------------------------------------------------------------------------------------------------
# reading a run: incremental tail of events.jsonl

class EventTail:
    """Reads only the complete lines appended since the last call (a long run's log is not re-parsed each second)."""

    def __init__(self, path: Path):
        self.path, self.offset, self.events = Path(path), 0, []
        self.lock = threading.Lock()

    def read(self) -> list[Event]:
        with self.lock:
            if self.path.exists() and self.path.stat().st_size < self.offset:
                self.offset, self.events = 0, []  # the file was replaced
            if self.path.exists():
                with open(self.path, "rb") as f:
                    f.seek(self.offset)
                    chunk = f.read()
                complete = chunk[: chunk.rfind(b"\n") + 1]
                self.offset += len(complete)
                self.events += _parse(complete)
            return list(self.events)


def _parse(chunk: bytes) -> list[Event]:
    out = []
    for line in chunk.decode("utf-8", errors="replace").splitlines():
        try:
            out.append(event_from_dict(json.loads(line)))
        except (ValueError, KeyError, TypeError):
            continue
    return out


_tails: dict[Path, EventTail] = {}


def run_events(run_dir: Path) -> list[Event]:
    path = Path(run_dir) / "events.jsonl"
    tail = _tails.setdefault(path.resolve(), EventTail(path))
    return tail.read()


@dataclass
class RunView:
    """What the live view shows of one run, all read from its folder."""
    run_dir: Path
    name: str
    state: str
    step: int = 0
    total_steps: int = 0
    it_per_s: float = 0.0
    eta_s: float = 0.0
    losses: list[tuple[int, float]] = field(default_factory=list)
    samples: list[tuple[str, str]] = field(default_factory=list)  # (path, caption) of the latest sample event
    messages: list[str] = field(default_factory=list)
    error: str = ""
    advice: str = ""
    adapter_path: str = ""

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0


def run_view(run_dir: Path) -> RunView:
    info = run_info(run_dir)
    view = RunView(Path(run_dir), info.name, info.state, info.step, info.total_steps, error=info.error,
                   advice=getattr(info, "advice", ""), adapter_path=str(info.adapter_path or ""))
    for e in run_events(run_dir):
        _apply(view, e)
    if view.state == "failed" and not view.advice and "out of memory" in view.error.lower():
        view.advice = OOM_ADVICE
    view.step = max(view.step, info.step)
    return view


def _apply(view: RunView, e: Event) -> None:
    if isinstance(e, Started):
        view.total_steps = e.total_steps
        view.losses = [(s, v) for s, v in view.losses if s <= e.start_step]  # a resume replays later steps
    elif isinstance(e, Progress):
        view.step, view.total_steps, view.it_per_s, view.eta_s = e.step, e.total_steps, e.it_per_s, e.eta_s
        view.losses.append((e.step, e.loss))
    elif isinstance(e, SampleWritten):
        view.samples = [(p, f"step {e.step}: {prompt}") for p, prompt in zip(e.paths, e.prompts)]
    elif isinstance(e, Message):
        view.messages.append(f"{e.level}: {e.text}")
    elif isinstance(e, CheckpointWritten):
        view.messages.append(f"info: checkpoint at step {e.step}")
    elif isinstance(e, Finished):
        view.step, view.adapter_path = e.step, e.adapter_path
    elif isinstance(e, Failed):
        view.error, view.advice = e.error, e.advice or view.advice


def latest_run(settings: AppSettings) -> Path | None:
    """The run the live view follows by default: the active one, else the newest."""
    active = active_run(settings)
    if active:
        return active
    found = list_runs(settings)
    return found[0].run_dir if found else None


def runs_table(settings: AppSettings) -> list[list]:
    """Rows for the runs list: name, state, step/total, started, folder."""
    import time
    rows = []
    for info in list_runs(settings):
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(info.started_at))
        rows.append([info.run_dir.name, info.state, f"{info.step}/{info.total_steps}", started,
                     "yes" if info.adapter_path and Path(info.adapter_path).exists() else ""])
    return rows


def read_log(run_dir: Path | None, max_chars: int = 20_000) -> str:
    if run_dir is None:
        return "No run selected."
    path = Path(run_dir) / "train.log"
    if not path.exists():
        return f"{path} does not exist (the run was started from the command line, or has not started yet)."
    text = path.read_text(encoding="utf-8", errors="replace")
    return text[-max_chars:] if text else "(the log is empty so far)"


def format_eta(seconds: float) -> str:
    if seconds <= 0:
        return "-"
    m, s = divmod(int(seconds + 0.5), 60)
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m" if h else (f"{m}m {s:02d}s" if m else f"{s}s")
