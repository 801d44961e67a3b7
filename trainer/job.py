"""A training in its own process: the app starts it, reads its events from the run folder and sends it commands.

The path of a run: `start_run(cfg)` checks the config on this machine (`check_config`) before anything is written,
creates the run folder (`runs`) and starts `python -m trainer.job RUN_DIR`; that child calls `run_here`, which
runs the `loop.Trainer` with `events.jsonl` as its consumer. The child owns the run folder, so a UI that restarts
(or a second browser tab) sees the same state by reading events.jsonl. The CLI's `train` calls `run_here` in its
own process, with a progress bar as a second consumer.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

from . import config as C
from . import runlock, runs
from .advice import advice_for
from .atomic import write_text_atomic
from .errors import UserError
from .events import INTERRUPTED, Event, EventLog, Failed, Finished, send_command, tail_events

# ----------------------------------------------------------------------------------------------------------------
# everything checked before a run folder exists: the config itself and what this machine can do for it (the CLI's
# train and validate call check_config too, so both refuse the same configs with the same messages)

def machine_problems(cfg: C.TrainConfig) -> list[str]:
    """What this machine cannot do for cfg (no CUDA for fp16 or 8-bit AdamW, a missing optional package)."""
    import torch
    problems = []
    cuda = torch.cuda.is_available()
    if cfg.precision.device == "cuda" and not cuda:
        problems.append("precision.device=cuda but no CUDA GPU is visible; use auto or cpu")
    on_cuda = cuda and cfg.precision.device != "cpu"
    if cfg.precision.mixed == "fp16" and not on_cuda:
        problems.append("precision.mixed=fp16 needs a CUDA GPU; on the CPU use bf16 or no")
    if cfg.optimizer.name == "adamw8bit":
        if not on_cuda:
            problems.append("optimizer.name=adamw8bit needs a CUDA GPU (bitsandbytes); on the CPU use adamw")
        elif importlib.util.find_spec("bitsandbytes") is None:
            problems.append("optimizer.name=adamw8bit needs bitsandbytes: pip install 'loradesk[cuda]'")
    if cfg.optimizer.name == "prodigy" and importlib.util.find_spec("prodigyopt") is None:
        problems.append("optimizer.name=prodigy needs the prodigy extra: pip install 'loradesk[prodigy]'")
    if cfg.logging.tensorboard and importlib.util.find_spec("tensorboard") is None:
        problems.append("logging.tensorboard needs the tensorboard extra: pip install 'loradesk[tensorboard]'")
    if on_cuda:
        problems += _gpu_problems(cfg, torch.cuda.device_count())
    return problems


def _gpu_problems(cfg: C.TrainConfig, gpus: int) -> list[str]:
    """distributed.* against this machine's GPUs: one process each, of the GPUs it has."""
    from .distributed import chosen_gpus
    if cfg.distributed.processes > gpus:
        return [f"distributed.processes is {cfg.distributed.processes} but this machine has {gpus} GPU(s): one "
                f"process per GPU (or precision.device=cpu for CPU processes)"]
    missing = [i for i in chosen_gpus(cfg.distributed.processes, cfg.distributed.gpus) if i >= gpus]
    return [f"distributed.gpus names GPU {missing[0]}, but this machine has {gpus} GPUs (0 to {gpus - 1})"] \
        if missing else []


def model_problems(cfg: C.TrainConfig) -> list[str]:
    """What the base model's files say of cfg (its config files or keys, not its weights): files that loading
    would refuse (an empty folder, a broken model_index.json, a LoRA, random bytes), a forced model.family that its
    structure contradicts, text encoders it does not have."""
    from .models import ModelLoadError, family_name, get_family, resolve_model_path
    from .models.detect import check_model_files
    from .network import text_encoder_problems
    try:
        check_model_files(Path(resolve_model_path(cfg.model.path)))
    except ModelLoadError as e:
        return [f"model.path: {e}"]
    name = family_name(cfg.model.path)
    if name is None:
        return []
    family = get_family(name)
    problems = text_encoder_problems(family, cfg)
    try:
        problems += family.model_problems(cfg, Path(resolve_model_path(cfg.model.path)))
    except ModelLoadError as e:  # a component file that is no readable .safetensors
        problems.append(f"model: {e}")
    if cfg.model.family not in ("auto", name):
        forced = get_family(cfg.model.family)
        where = cfg.model.path or "the built-in tiny model"
        problems.append(f"model.family is {cfg.model.family} ({forced.label}), but {where} is a {family.label} model "
                        f"({name}); set model.family=auto or {name}")
    return problems


def config_problems(cfg: C.TrainConfig, check_paths: bool = True) -> list[str]:
    """Every problem with cfg on this machine (empty = it can train here)."""
    problems = C.validate(cfg, check_paths)
    if not any(p.startswith("model.") for p in problems):
        problems += model_problems(cfg)
    if check_paths:
        problems += runs.runs_dir_problems(cfg.saving.runs_dir)
    return problems + [p for p in machine_problems(cfg) if p not in problems]


def check_config(cfg: C.TrainConfig, source: str | None = None, check_paths: bool = True) -> C.TrainConfig:
    """config_problems(), raised as one ConfigError naming every problem."""
    problems = config_problems(cfg, check_paths)
    if problems:
        raise C.ConfigError(problems, source)
    return cfg


# keys that change what a checkpoint holds or which batches come next: a resumed run must keep them
FROZEN_ON_RESUME = ("network.", "run.", "dataset.", "model.", "optimizer.name", "schedule.gradient_accumulation")


class JobError(UserError):
    """A job that cannot start (another run is going, nothing to resume)."""


class Job:
    def __init__(self, run_dir: Path, process: subprocess.Popen | None = None):
        self.run_dir = Path(run_dir)
        self.process = process

    def events(self) -> list[Event]:
        return tail_events(self.run_dir / "events.jsonl")

    def info(self) -> runs.RunInfo:
        return runs.run_info(self.run_dir)

    def stop(self) -> None:
        send_command(self.run_dir, "stop")

    def wait(self, timeout: float | None = None) -> int:
        if self.process is None:
            raise JobError("this job was not started by this process; poll info() instead")
        return self.process.wait(timeout)


_children: list[Job] = []  # started here; polled so that finished ones are reaped, not left as zombies


def active_run(runs_dir: str | Path) -> runs.RunInfo | None:
    """The run whose trainer process is alive, if any (one device, one job). A child this process started counts
    from its start, while it still loads the model and has written no event."""
    _children[:] = [job for job in _children if job.process.poll() is None]
    root = C.expand_path(runs_dir).resolve()
    for job in _children:
        if job.run_dir.resolve().parent != root:
            continue
        info = runs.run_info(job.run_dir)
        if info.state in runs.FINAL_STATES and _exits_soon(job):
            continue  # its last event is written; it only closes its files
        return dataclasses.replace(info, state="running", error="", advice="")
    return runs.running_run(runs_dir)


def _exits_soon(job: Job, seconds: float = 10.0) -> bool:
    try:
        job.process.wait(seconds)
    except subprocess.TimeoutExpired:
        return False
    return True


def start_run(cfg: C.TrainConfig, env: dict | None = None) -> Job:
    """Check the config on this machine, create the run folder and start the trainer process."""
    check_config(cfg)
    _refuse_if_busy(cfg.saving.runs_dir)
    return _spawn(runs.create_run_dir(cfg), resume=False, env=env)


def resume_run(run_dir: str | Path, overrides: list[str] | None = None, env: dict | None = None) -> Job:
    """Continue a stopped or crashed run from its last checkpoint (overrides: e.g. schedule.max_steps=2000)."""
    _refuse_if_busy(Path(run_dir).resolve().parent)
    return _spawn(check_resumable(run_dir, overrides), resume=True, env=env)


def check_resumable(run_dir: str | Path, overrides: list[str] | None = None) -> Path:
    """The run folder, once it is known to resume: a checkpoint, not running, its config (with the overrides
    applied and saved) valid on this machine."""
    run_dir = Path(run_dir).resolve()
    cfg = runs.load_run_config(run_dir, clean=True)
    if runs.run_info(run_dir).state == "running":
        raise JobError(f"{run_dir.name} is still running")
    runs.begin_attempt(run_dir)  # first: a checkpoint caught mid-swap is put back before we look for one
    _refuse_without_checkpoint(run_dir, cfg)
    if overrides:
        cfg = _resume_overrides(cfg, overrides)
    check_config(cfg, source=str(run_dir / "config.toml"))
    if overrides:
        write_text_atomic(run_dir / "config.toml", C.dumps(cfg))
    return run_dir


def _refuse_without_checkpoint(run_dir: Path, cfg: C.TrainConfig) -> None:
    found, skipped = runs.resumable_checkpoint(run_dir)
    if found is not None:
        return
    if skipped:
        damaged = "; ".join(f"{p.name}: {why}" for p, why in skipped)
        raise JobError(f"every checkpoint of {run_dir.name} is damaged ({damaged}); start a new run")
    if cfg.saving.every_n_steps > 0:
        raise JobError(f"{run_dir.name} ended before its first checkpoint (one is written every "
                       f"{cfg.saving.every_n_steps} steps), so there is nothing to resume; start it again")
    raise JobError(f"{run_dir} has no checkpoint to resume from; set saving.every_n_steps to write "
                   f"checkpoints, or start a new run")


def _resume_overrides(cfg: C.TrainConfig, overrides: list[str]) -> C.TrainConfig:
    """--set on a run being resumed, refusing keys the checkpoint or the batch order depend on. The process count
    and the per-process batch may change together, as long as the global batch stays what it was."""
    from .config import global_batch, world_size
    keys = [o.split("=", 1)[0].strip() for o in overrides]
    frozen = [k for k in keys if k.startswith(FROZEN_ON_RESUME) and k != "dataset.batch_size"]
    if frozen:
        raise JobError(f"{', '.join(frozen)} cannot change when resuming (the checkpoint and the batch order depend "
                       f"on them); start a new run instead")
    before = global_batch(cfg)
    cfg = C.apply_overrides(copy.deepcopy(cfg), overrides)
    if global_batch(cfg) != before:
        raise JobError(f"resuming with {world_size(cfg)} process(es) x batch_size {cfg.dataset.batch_size} "
                       f"changes the global batch from {before} to {global_batch(cfg)} images per step; keep "
                       f"dataset.batch_size x distributed.processes x machines x gradient_accumulation = {before}")
    return cfg


def _refuse_if_busy(runs_dir) -> None:
    busy = active_run(runs_dir)
    if busy is not None:
        raise JobError(f"run {busy.run_dir.name} is still training; stop it first (one device, one job)")


def _spawn(run_dir: Path, resume: bool, env: dict | None) -> Job:
    cmd = [sys.executable, "-m", "trainer.job", str(run_dir.resolve())] + (["--resume"] if resume else [])
    with open(run_dir / "train.log", "ab") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=child_env(env), start_new_session=True)  # the run outlives a closed UI
    job = Job(run_dir, process)
    _children.append(job)
    return job


def child_env(env: dict | None = None) -> dict:
    """The child runs `python -m trainer.job`: this trainer package must be importable from any working folder."""
    env = dict(os.environ if env is None else env)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


# ----------------------------------------------------------------------------------------------------------------
# running a training in this process (the child above, or the CLI)

def run_here(run_dir: str | Path, resume: bool = False, callbacks: list | None = None) -> int:
    """Train the run folder's config here, events to events.jsonl; 0 done, 1 failed run, 2 bad config or data.
    The first Ctrl+C (or SIGTERM) stops after the current step and still writes the adapter."""
    from . import distributed
    run_dir = Path(run_dir)
    if distributed.in_worker() and (distributed.launched_by_us() or not distributed.is_main_process()):
        # one of several processes: the launcher (or, under accelerate launch, process 0) holds the lock
        return _train_holding_lock(run_dir, resume, callbacks)
    try:  # taken before torch loads: the run reads as training from the process's first second (runlock.py)
        with runlock.holding(run_dir) as lock:  # and held until the last event is written
            cfg = runs.load_run_config(run_dir)
            if distributed.needs_launcher(cfg) and not distributed.in_worker():
                return distributed.run_launched(cfg, run_dir, resume, callbacks or [], lock=lock)
            return _train_holding_lock(run_dir, resume, callbacks)
    except runlock.RunLockedError as e:
        raise JobError(str(e)) from None


def _train_holding_lock(run_dir: Path, resume: bool, callbacks: list | None) -> int:
    from .loop import Trainer
    from .distributed import is_main_process, report_to_stderr
    cfg = runs.load_run_config(run_dir)
    if not is_main_process():  # one writer: the other processes write no events, only say why they failed
        return _train(Trainer(cfg, run_dir, callbacks=[report_to_stderr(int(os.environ["RANK"]))]), resume)
    consumers = [EventLog(run_dir / "events.jsonl"), *(callbacks or [])]
    if cfg.logging.tensorboard:
        from .tracking import TensorBoardLog
        consumers.append(TensorBoardLog(run_dir))
    return _train(Trainer(cfg, run_dir, callbacks=consumers), resume)


def _train(trainer, resume: bool) -> int:
    interrupted = _stop_on_interrupt(trainer)
    try:
        path = trainer.run(resume=resume)
    except Aborted:  # torchrun ends the processes: the launcher reports
        return INTERRUPTED
    except KeyboardInterrupt:  # Ctrl+C while the model loaded: stopped at once, nothing written
        trainer.emit(Finished(step=trainer.step, adapter_path="", stopped=True))
        return INTERRUPTED
    except UserError as e:  # bad data, model or config found while loading: the run never trained
        trainer.emit(Failed(step=trainer.step, error=str(e)))
        raise
    except Exception as e:  # out of memory while loading, a crash: the run's state must still say why
        from .distributed import is_peer_failure
        if interrupted["while_loading"] and not trainer.loaded:  # Ctrl+C inside a library's import, turned into
            # another error (should loading have gone on, a later failure is a failure, not the stop)
            trainer.emit(Finished(step=trainer.step, adapter_path="", stopped=True))
            return INTERRUPTED
        if is_peer_failure(e):  # another process died: the launcher's Failed names it
            print(f"stopped: {type(e).__name__}: {str(e).splitlines()[0][:200]}", file=sys.stderr)
            return 1
        error = f"{type(e).__name__}: {e}"
        last = runs.last_checkpoint(trainer.run_dir)  # what a resume would start from, as the loop's failures say
        trainer.emit(Failed(step=trainer.step, error=error, advice=advice_for(error), last_checkpoint=str(last or "")))
        raise
    return 0 if path is not None or trainer.stopped_untrained else 1


class Aborted(BaseException):
    """A process of a multi-process run told to end now (not an Exception: nothing on the way may catch it)."""


def _stop_on_interrupt(trainer) -> dict:
    """While the model loads, Ctrl+C (or SIGTERM) stops at once and writes nothing. Then the first one stops after
    this step and writes the adapter; a second aborts (writes are atomic). A process of run_launched's torchrun
    hears a stop as a command, so a SIGTERM from torchrun (the user's second Ctrl+C, or another process died)
    ends it at once."""
    from .distributed import in_worker, launched_by_us
    ours = in_worker() and launched_by_us()

    def handler(signum, frame):
        if ours and signum == signal.SIGTERM:
            if trainer.ending:  # its last event is being written (a Failed the launcher would not know)
                return
            raise Aborted
        if not trainer.loaded:
            interrupted["while_loading"] = True
            if trainer.inbox is not None:  # should a library swallow the KeyboardInterrupt, the loop still stops
                trainer.inbox.request("stop")
            raise KeyboardInterrupt  # loading takes seconds to minutes: do not wait for it (issue 15)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("\nstopping after this step (Ctrl+C again to abort)", file=sys.stderr)
        if trainer.inbox is not None:
            trainer.inbox.request("stop")
    interrupted = {"while_loading": False}
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return interrupted


def main(argv: list[str] | None = None) -> int:
    """The child process: `python -m trainer.job RUN_DIR [--resume]` (its output goes to RUN_DIR/train.log)."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0].startswith("-"):
        print("usage: python -m trainer.job RUN_DIR [--resume]", file=sys.stderr)
        return 2
    try:
        return run_here(args[0], resume="--resume" in args[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
