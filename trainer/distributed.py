"""Data-parallel training over several processes (GPUs, or CPU processes over gloo) and machines.

Who does what: torchrun (torch.distributed's launcher, which accelerate's own launcher builds on) starts the
processes and tears them all down when one dies; accelerate forms the process group (NCCL on GPUs, gloo on the CPU)
and wraps the LoRA-injected UNet in DistributedDataParallel, which all-reduces its gradients; this module only
decides the command line, which share of each global batch a process trains, and how the launcher reports a process
that died. For LoRA, plain DDP is what scales: the trainable parameters are few, so full-shard schemes only add
communication.

Exactness: every sample's randomness is drawn from (seed, batch, position in the global batch) (loop.py), and each
process's loss is its share of the global mean, so a global batch trains the same way however many processes
share it.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from . import config as C

WORKER_ENV = "TORCHELASTIC_RUN_ID"  # set by torchrun in every process it starts


def world_size(cfg: C.TrainConfig) -> int:
    return cfg.distributed.processes * cfg.distributed.machines


def global_batch(cfg: C.TrainConfig) -> int:
    """Images per optimizer step: batch_size x processes x machines x gradient_accumulation."""
    return cfg.dataset.batch_size * world_size(cfg) * cfg.schedule.gradient_accumulation


def in_worker() -> bool:
    """This process is one of those torchrun started (the launcher above it holds the run lock)."""
    return WORKER_ENV in os.environ


def is_main_process() -> bool:
    """Rank 0 (torchrun's RANK), the one process that writes events, samples, checkpoints and the adapter."""
    return os.environ.get("RANK", "0") == "0"


def launch_command(cfg: C.TrainConfig, run_dir: str | Path, resume: bool = False) -> list[str]:
    """The torchrun command that starts this machine's processes of the run (the same on every machine but for
    --node-rank)."""
    d = cfg.distributed
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(d.processes),
           "--nnodes", str(d.machines), "--node-rank", str(d.machine_rank),
           "--master-addr", d.main_address, "--master-port", str(d.main_port), "--max-restarts", "0",
           "-m", "trainer.job", str(Path(run_dir).resolve())]
    return cmd + (["--resume"] if resume else [])


def launch_env(cfg: C.TrainConfig, env: dict | None = None) -> dict:
    """The processes' environment: the chosen GPUs, and on the CPU each process its share of the cores."""
    env = dict(os.environ if env is None else env)
    if cfg.distributed.gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, C.gpu_list(cfg.distributed.gpus)))
    if "OMP_NUM_THREADS" not in env:  # torchrun would set 1; share the cores instead
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // cfg.distributed.processes))
    return env


def share(indices: list, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of process `rank`'s contiguous share of a global batch (sizes differ by at most one)."""
    n = len(indices)
    return rank * n // world, (rank + 1) * n // world


class DataParallelUNet:
    """The UNet called through its DistributedDataParallel wrapper (whose backward all-reduces the LoRA gradients),
    while everything else a family reads (config, dtype, device) comes from the UNet itself."""

    def __init__(self, wrapped):
        self._wrapped = wrapped

    def __call__(self, *args, **kwargs):
        return self._wrapped(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._wrapped.module, name)


# ----------------------------------------------------------------------------------------------------------------
# the launcher: this machine's processes, Ctrl+C as a stop command, a dead process named

def run_launched(cfg: C.TrainConfig, run_dir: Path, resume: bool, callbacks: list | None = None,
                 env: dict | None = None) -> int:
    """Start the run's processes through torchrun and wait for them; 0 done, 1 failed. Ctrl+C (or SIGTERM) sends
    the run a stop command, so every process stops after the same step; a second one ends them. `callbacks` (the
    CLI's progress bar) hear the main process's events from events.jsonl."""
    import threading
    from .events import send_command
    done = threading.Event()
    forwarder = threading.Thread(target=_forward_events, args=(Path(run_dir), callbacks or [], done), daemon=True)
    forwarder.start()
    log = open(Path(run_dir) / "train.log", "ab")
    # the processes' output (library bars, tracebacks) goes to train.log; the user hears the events
    process = subprocess.Popen(launch_command(cfg, run_dir, resume), stdout=log, stderr=subprocess.PIPE,
                               stdin=subprocess.DEVNULL, env=launch_env(cfg, env), start_new_session=True)
    stops = []

    def on_signal(signum, frame):
        stops.append(signum)
        if len(stops) == 1:
            print("\nstopping every process after this step (Ctrl+C again to abort)", file=sys.stderr)
            send_command(run_dir, "stop")
        else:
            os.killpg(process.pid, signal.SIGTERM)
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        errors = _relay(process, log)
        code = process.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        log.close()
    if code != 0:
        _report_dead_process(run_dir, errors, code)
    done.set()
    forwarder.join()
    return 0 if code == 0 else 1


def _forward_events(run_dir: Path, callbacks: list, done) -> None:
    """Each event appended to events.jsonl from now on, to `callbacks`, until `done` (then what is left)."""
    from .events import EventTail
    tail = EventTail(run_dir / "events.jsonl")
    seen = len(tail.read())
    while True:
        finished = done.wait(0.5)
        events = tail.read()
        for event in events[seen:]:
            for callback in callbacks:
                callback(event)
        seen = len(events)
        if finished:
            return


def _relay(process: subprocess.Popen, log) -> str:
    """The processes' stderr to train.log; its end kept, to find which process failed."""
    kept = []
    for line in iter(process.stderr.readline, b""):
        log.write(line)
        log.flush()
        kept.append(line.decode(errors="replace"))
        del kept[:-400]
    return "".join(kept)


def _report_dead_process(run_dir: Path, errors: str, code: int) -> None:
    """A Failed event naming the process that died, unless a process already said why the run failed."""
    from . import runs
    from .events import EventLog, Failed
    info = runs.run_info(run_dir)
    dead = dead_process(errors)
    if info.state == "failed" and not dead:
        return
    what = dead or f"the training processes exited with code {code}"
    last = runs.last_checkpoint(run_dir)
    kept = f"; the last good checkpoint ({last.name}) is kept: resume the run" if last else ""
    EventLog(Path(run_dir) / "events.jsonl")(Failed(step=info.step, error=what + kept,
                                                    last_checkpoint=str(last or "")))


def dead_process(torchrun_errors: str) -> str:
    """'process 1 of the run died (signal 9, SIGKILL)' from torchrun's failure summary; '' when it names none."""
    cause = torchrun_errors.rpartition("Root Cause")[2]
    rank = re.search(r"^\s*rank\s*:\s*(\d+)", cause, re.M)
    code = re.search(r"^\s*exitcode\s*:\s*(-?\d+)", cause, re.M)
    if not (rank and code):
        return ""
    rank, code = int(rank.group(1)), int(code.group(1))
    if code < 0:
        try:
            how = f"signal {-code}, {signal.Signals(-code).name}"
        except ValueError:
            how = f"signal {-code}"
        return f"training process {rank} died ({how})"
    return f"training process {rank} failed (exit code {code})"
