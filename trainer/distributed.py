"""Data-parallel training over several processes (GPUs, or CPU processes over gloo) and machines.

Who does what: torchrun (torch.distributed's launcher, which accelerate's own launcher builds on) starts the
processes and tears them all down when one dies; accelerate forms the process group (NCCL on GPUs, gloo on the CPU)
and wraps the LoRA-injected UNet in DistributedDataParallel, which all-reduces its gradients; this module only
decides the command line, which share of each global batch a process trains, and how the launcher reports a process
that died. For LoRA, plain DDP is what scales: the trainable parameters are few, so full-shard schemes only add
communication.

Exactness: every sample's randomness is drawn from (seed, batch, position in the global batch) (loop.py), and each
process's loss is its share of the global mean, so a global batch trains the same way however many processes
share it (LoRA dropout masks included: dropout.py).
"""
from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from . import config as C
from .config import world_size

WORKER_ENV = "TORCHELASTIC_RUN_ID"  # set by torchrun (and accelerate launch, which runs it) in every process
OURS_ENV = "LORADESK_LAUNCHER"  # set by run_launched to its pid: the launcher above holds the run lock and reports


def in_worker() -> bool:
    """This process is one of those torchrun started (by run_launched, or by `accelerate launch` / `torchrun -m
    trainer train` from the user's shell)."""
    return WORKER_ENV in os.environ


def launched_by_us() -> bool:
    return OURS_ENV in os.environ


def as_launched(cfg: C.TrainConfig) -> C.TrainConfig:
    """`cfg` with distributed.processes and machines as the outside launcher started them (its WORLD_SIZE and
    LOCAL_WORLD_SIZE): with `accelerate launch --num_processes N` the command line already says how many."""
    world, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    C.set_value(cfg, "distributed.processes", local)
    C.set_value(cfg, "distributed.machines", max(1, world // local))
    return cfg


def launch_marker(runs_dir: str | Path) -> Path:
    """Where process 0 names the run folder for the others: keyed by the launch (torchrun's run id, which is
    "none" unless --rdzv-id is given, and the agent's pid, the parent of every process of one launch). One machine
    only: several machines use this CLI's own launcher (distributed.machines)."""
    return C.expand_path(runs_dir) / f".launch-{os.environ[WORKER_ENV]}-{os.getppid()}"


def shared_run_dir(runs_dir: str | Path, create, timeout: float = 300.0) -> Path:
    """The one run folder of processes an outside launcher started, each running `python -m trainer train`: rank 0
    creates it (`create()`) and names it in launch_marker(); the others wait for that file. Process 0 removes the
    marker when the run ends."""
    import time
    from .atomic import write_text_atomic
    marker = launch_marker(runs_dir)
    if is_main_process():
        run_dir = Path(create())
        write_text_atomic(marker, str(run_dir.resolve()))
        return run_dir
    deadline = time.monotonic() + timeout
    while not marker.is_file():
        if time.monotonic() > deadline:
            raise C.ConfigError([f"process 0 did not create the run folder in {timeout:.0f} s (waited for {marker})"])
        time.sleep(0.2)
    return Path(marker.read_text(encoding="utf-8").strip())


def is_main_process() -> bool:
    """Rank 0 (torchrun's RANK), the one process that writes events, samples, checkpoints and the adapter."""
    return os.environ.get("RANK", "0") == "0"


@functools.cache
def visible_gpus() -> list[str]:
    """This machine's CUDA GPUs (as CUDA_VISIBLE_DEVICES shows them), by index: 'name (memory)'; [] without.
    Counting them loads torch (seconds of a page load): where it is not loaded yet and neither NVIDIA's nor AMD's
    tools are installed, there is no GPU to count."""
    import shutil
    if "torch" not in sys.modules and not (shutil.which("nvidia-smi") or shutil.which("rocm-smi")):
        return []
    import torch
    if not torch.cuda.is_available():
        return []
    found = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    return [f"{p.name} ({p.total_memory / 2 ** 30:.0f} GB)" for p in found]


def chosen_gpus(processes: int, gpus: str) -> list[int]:
    """The GPUs distributed.processes and distributed.gpus train on: those named, else the first `processes`
    ([] when gpus does not parse: config.validate names that)."""
    try:
        return C.gpu_list(gpus) or list(range(processes))
    except ValueError:
        return []


def needs_launcher(cfg: C.TrainConfig) -> bool:
    """A run starts through torchrun (run_launched) with several processes, or with its GPU picked by number:
    CUDA_VISIBLE_DEVICES, set before a process starts, is what puts even one process on GPU 1."""
    return world_size(cfg) > 1 or bool(cfg.distributed.gpus.strip())


def gpu_settings(indices: list[int]) -> dict[str, object]:
    """The distributed.* values that train on these GPUs, one process each (none picked: the first one)."""
    indices = sorted(set(indices)) or [0]
    first = indices == list(range(len(indices)))
    return {"distributed.processes": len(indices), "distributed.gpus": "" if first else ",".join(map(str, indices))}


def launch_command(cfg: C.TrainConfig, run_dir: str | Path, resume: bool = False) -> list[str]:
    """The torchrun command that starts this machine's processes of the run (the same on every machine but for
    --node-rank)."""
    d = cfg.distributed
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(d.processes)]
    if d.machines == 1:  # torchrun finds a free port itself: two runs, or a busy 29500, never collide
        cmd += ["--standalone"]
    else:
        cmd += ["--nnodes", str(d.machines), "--node-rank", str(d.machine_rank), "--master-addr", d.main_address,
                "--master-port", str(d.main_port)]
    cmd += ["--max-restarts", "0", "-m", "trainer.job", str(Path(run_dir).resolve())]
    return cmd + (["--resume"] if resume else [])


def process_group_options(cfg: C.TrainConfig):
    """accelerate's options for the process group: the collective timeout of distributed.timeout_minutes (torch's
    own is 10 minutes on NCCL, shorter than process 0's validation or samples may take on a large run)."""
    from datetime import timedelta
    from accelerate.utils import InitProcessGroupKwargs
    return InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.distributed.timeout_minutes))


def launch_env(cfg: C.TrainConfig, env: dict | None = None) -> dict:
    """The processes' environment: the chosen GPUs, and on the CPU each process its share of the cores."""
    env = dict(os.environ if env is None else env, **{OURS_ENV: str(os.getpid())})
    if cfg.distributed.gpus:  # numbered as this machine lists them: within an inherited CUDA_VISIBLE_DEVICES
        listed = [v.strip() for v in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        picked = C.gpu_list(cfg.distributed.gpus)
        env["CUDA_VISIBLE_DEVICES"] = ",".join(listed[i] if i < len(listed) else str(i) for i in picked)
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


class LauncherWatch:
    """Process 0's watch on what started it: run_launched's launcher, and torchrun under it. Killed (kill -9, the
    OOM killer), they can no longer report or stop the run, and process 0 stops every process after the step,
    adapter written. The run's lock: torchrun inherits the launcher's, and a thread of process 0 waits for it, so
    the moment both are gone it is process 0's and the run never reads as ended while a process trains. POSIX
    only, like the launcher's process groups."""

    def __init__(self, run_dir: Path):
        ours = in_worker() and launched_by_us() and os.name == "posix" and is_main_process()
        self.launcher, self.agent, self.held = (int(os.environ[OURS_ENV]) if ours else 0), os.getppid(), None
        if ours:
            import threading
            threading.Thread(target=self._hold, args=(run_dir,), daemon=True).start()

    def _hold(self, run_dir: Path) -> None:
        from .runlock import hold_when_free
        self.held = hold_when_free(run_dir)

    def launcher_gone(self) -> bool:
        """True once, when the launcher or torchrun is found gone."""
        from .runlock import pid_alive
        if not self.launcher or (self.held is None and pid_alive(self.launcher) and os.getppid() == self.agent):
            return False
        self.launcher = 0
        return True


# ----------------------------------------------------------------------------------------------------------------
# the launcher: this machine's processes, Ctrl+C as a stop command, a dead process named

def run_launched(cfg: C.TrainConfig, run_dir: Path, resume: bool, callbacks: list | None = None,
                 env: dict | None = None, lock=None) -> int:
    """Start the run's processes through torchrun and wait for them; 0 done, 1 failed, job.INTERRUPTED aborted.
    Ctrl+C (or SIGTERM) sends the run a stop command, so every process stops after the same step; a second one
    ends them at once. `callbacks` (the CLI's progress bar) hear the main process's events from events.jsonl.
    `lock`, the run's open lock file, is passed on to torchrun, so the run's lock is held while it lives."""
    import threading
    from .events import read_events, send_command
    before = len(read_events(Path(run_dir) / "events.jsonl"))  # this attempt's events come after these
    done = threading.Event()
    forwarder = threading.Thread(target=_forward_events, args=(Path(run_dir), callbacks or [], done), daemon=True)
    forwarder.start()
    log = open(Path(run_dir) / "train.log", "ab")
    start = log.seek(0, os.SEEK_END)
    # the processes' output (library bars, tracebacks, torchrun's summary) goes to train.log, a file that outlives
    # this process (a pipe to it would break every process's next write if it were killed); the user hears events
    process = subprocess.Popen(launch_command(cfg, run_dir, resume), stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, env=launch_env(cfg, env), start_new_session=True,
                               pass_fds=(lock.fileno(),) if lock is not None else ())
    stops = []

    def on_signal(signum, frame):
        stops.append(signum)
        if len(stops) == 1:
            print("\nstopping every process after this step (Ctrl+C again to abort)", file=sys.stderr)
            send_command(run_dir, "stop")
        else:  # torchrun passes SIGTERM on; each process ends at once (job.Aborted), torchrun's grace unused
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:  # torchrun has ended already
                pass
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = process.wait()
        if code < 0 and len(stops) < 2:  # torchrun itself was killed; its processes (own sessions) may live on
            _wait_for_last_event(Path(run_dir), before)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        log.close()
    code = _outcome(run_dir, _log_tail(Path(run_dir) / "train.log", start), code, before, aborted=len(stops) > 1)
    done.set()
    forwarder.join()
    return code


def _wait_for_last_event(run_dir: Path, before: int, quiet_s: float = 60.0) -> None:
    """torchrun was killed: process 0 sees its parent gone (LauncherWatch) and stops every process after the
    step. Wait for that Finished (or Failed) while events keep coming, so the report below is how the run ended
    (with nothing new for `quiet_s` seconds, the processes died with torchrun)."""
    import time
    from .events import Failed, Finished, read_events
    count, last_new = before, time.monotonic()
    while time.monotonic() - last_new < quiet_s:
        events = read_events(run_dir / "events.jsonl")
        if any(isinstance(e, (Finished, Failed)) for e in events[before:]):
            return
        if len(events) > count:
            count, last_new = len(events), time.monotonic()
        time.sleep(0.5)


def _outcome(run_dir: Path, errors: str, code: int, before: int, aborted: bool) -> int:
    """0 done, 1 failed, INTERRUPTED aborted. An abort (the second Ctrl+C) leaves the run stopped where it was,
    as one process's does, unless the run had ended anyway or a process had failed before it (torchrun names it):
    then that is what the user must hear."""
    from .events import INTERRUPTED, EventLog, Failed, Finished, read_events
    events = read_events(Path(run_dir) / "events.jsonl")[before:]
    if code == 0 or any(isinstance(e, Finished) for e in events):
        return 0
    if aborted and not dead_process(errors) and not any(isinstance(e, Failed) for e in events):
        step = _last_step(events)
        EventLog(Path(run_dir) / "events.jsonl")(Finished(step=step, adapter_path="", stopped=True))
        return INTERRUPTED
    return 0 if _report_failure(run_dir, errors, code, before) else 1


def _last_step(events: list) -> int:
    """The last step this attempt's events say was trained."""
    from .events import Progress
    return max([e.step for e in events if isinstance(e, Progress)], default=0)


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


def _log_tail(path: Path, start: int, size: int = 64_000) -> str:
    """The end of what this attempt wrote to train.log: where torchrun names the process that failed."""
    with open(path, "rb") as f:
        f.seek(max(start, f.seek(0, os.SEEK_END) - size))
        return f.read().decode(errors="replace")


def _report_failure(run_dir: Path, errors: str, code: int, before: int) -> bool:
    """After torchrun failed: True when this attempt had finished anyway (a teardown error); else a Failed event
    naming the process that died or failed, unless process 0 already said why the run failed."""
    from . import runs
    from .events import EventLog, Failed, Finished, read_events
    events = read_events(Path(run_dir) / "events.jsonl")[before:]
    if any(isinstance(e, Finished) for e in events):
        return True
    if any(isinstance(e, Failed) for e in events):
        return False
    what = dead_process(errors) or f"the training processes exited with code {code}"
    said = [line.split(": ", 1)[1] for line in errors.splitlines() if line.startswith(REPORT_PREFIX)]
    last = runs.last_checkpoint(run_dir)
    kept = f"; the last good checkpoint ({last.name}) is kept: resume the run" if last else ""
    step = _last_step(events)
    EventLog(Path(run_dir) / "events.jsonl")(Failed(step=step, error=what + (f": {said[-1]}" if said else "") + kept,
                                                    last_checkpoint=str(last or "")))
    return False


REPORT_PREFIX = "loradesk process"  # how a process other than 0 says why it failed (it writes no events)


def report_to_stderr(rank: int):
    """The consumer of a process other than 0: its failure (and warnings) as one line each on stderr, which the
    launcher keeps in train.log and quotes in the Failed event."""
    def report(event) -> None:
        from .events import Failed, Message
        if isinstance(event, Failed):
            print(f"{REPORT_PREFIX} {rank} failed: {event.error}" + (f" ({event.advice})" if event.advice else ""),
                  file=sys.stderr, flush=True)
        elif isinstance(event, Message) and event.level != "info":
            print(f"{REPORT_PREFIX} {rank} {event.level}: {event.text}", file=sys.stderr, flush=True)
    return report


PEER_MARKERS = ("Connection closed by peer", "Connection reset by peer", "remote worker", "communicator was aborted")


def is_peer_failure(error: BaseException) -> bool:
    """A collective that failed because another process died (torch's DistError; gloo raises a plain RuntimeError
    saying so): the launcher names that process instead."""
    if not in_worker():
        return False
    text = str(error)
    return any(cls.__name__ == "DistError" for cls in type(error).__mro__) or any(m in text for m in PEER_MARKERS)


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
