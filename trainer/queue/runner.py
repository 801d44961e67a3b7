"""`python -m trainer queue run`: work through the queue, one job at a time per lane, each in a child process.

A child process per job, as ai-toolkit's and SimpleTuner's queues do: a crash, an out-of-memory or a NaN in one job is
that child's exit, recorded with its message, and the next job starts in a clean process. The queue is read again
before every job, so a move or a remove made while a job runs decides what runs next.

Nothing runs twice, whatever is killed when: a training job records its run folder before its child starts, and
every job records its child's pid right after. A runner that starts finds any job still marked running (its runner
was killed) and first waits while that job's child lives (its recorded pid, checked to be still ours, and for a
training the run's lock, trainer/runlock.py); then it records how the job ended (a training: from its run's events;
an export or blend: from its output file) or runs it again (a training resumes from its last checkpoint, `python -m
trainer train --resume RUN_DIR`). Only then does it take the next queued job. The one moment left uncovered is the
few milliseconds between starting a child and recording its pid.

Why the pid and not the run's lock taken before the child starts and handed to it (pass_fds, as
trainer/distributed.py does for torchrun): exports, blends and captionings have no run lock at all, and a training's
child (trainer.job, or `train --resume` through the CLI) takes its own lock, so a hand-over would change both entry
points; the pid covers every kind of job with code in this file alone.

Lanes (one per GPU set, as ai-toolkit's queue has one worker per gpu_ids): a job's lane is its
distributed.gpus; `queue run --gpus 0,1` runs that lane's jobs, several lanes at once; `queue run` without --gpus runs
every job, one at a time (one device), and excludes lane runners. The locks are flocks (dropped by the kernel when a
runner dies, kill -9 included); where the OS has none (Windows) nothing stops a second runner.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .. import config as C
from .. import runs
from ..errors import UserError
from ..events import INTERRUPTED, Failed, Finished, Started, send_command, tail_events
from ..job import child_env
from ..runlock import is_held, pid_alive
from .notify import notify_end
from .store import QueueError, QueueJob, claim_next, next_job, queue_dir, read_queue, update_job

__all__ = ["child_alive", "lane_of", "next_job", "orphan_command_outcome", "run_queue", "runner_active",
           "runner_lock"]

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

RUNNER_LOCK = ".run.lock"  # exclusive: `queue run` over every lane; shared: a lane runner
POLL_S = 1.0
LOCK_WAIT_S = 1.5  # how long a starting runner waits out another process's look at its lock (runner_active)


def lane_of(gpus: str) -> str:
    """distributed.gpus normalised ("0, 1" -> "0,1"); "" = the default device."""
    try:
        return ",".join(str(i) for i in C.gpu_list(gpus))
    except ValueError:
        raise QueueError(f"--gpus {gpus!r} is no list of GPU indices; give e.g. 0 or 0,1") from None


@dataclass
class Control:
    """What one `queue run` was told: where to report, and whether to stop after the running job."""
    say: object = print
    warn: object = None
    webhooks: list = field(default_factory=list)
    desktop: bool = False
    stopping: bool = False  # the stop was passed on to the running job: the queue ends after it
    stop_asked: bool = False  # SIGTERM came (set by its handler; acted on where the runner waits)
    failed: int = 0

    def warning(self, line: str) -> None:
        (self.warn or (lambda text: print(text, file=sys.stderr)))(line)


# ---- locks ----------------------------------------------------------------------------------------------------------

def _flock(path: Path, exclusive: bool):
    """The open file holding the lock, None if another process holds it (or the OS has no flock: a dummy)."""
    f = open(path, "a+b")
    if fcntl is None:
        return f
    try:
        fcntl.flock(f, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


@contextmanager
def runner_lock(runs_dir: str | Path, lane: str | None):
    """Held for as long as a `queue run` lives; a QueueError when another one already runs these jobs."""
    qdir = queue_dir(runs_dir)
    qdir.mkdir(parents=True, exist_ok=True)
    wanted = [(qdir / RUNNER_LOCK, lane is None)]
    if lane is not None:
        wanted.append((qdir / f".lane-{lane.replace(',', '_') or 'default'}.lock", True))
    with ExitStack() as stack:
        for path, exclusive in wanted:
            f = _flock_patiently(path, exclusive)
            if f is None:
                which = "every lane" if lane is None else f"lane --gpus {lane or 'default'}"
                raise QueueError(f"another `python -m trainer queue run` already works through {qdir} ({which}); "
                                 f"one runner per lane: stop that one first, or let it go on")
            stack.enter_context(f)
        yield


def _flock_patiently(path: Path, exclusive: bool, wait_s: float = LOCK_WAIT_S):
    """_flock, tried again for a moment: runner_active takes the same lock for an instant to look (the app's Queue
    tab does every few seconds), and a runner starting in that instant must not take it for another runner."""
    deadline = time.monotonic() + wait_s
    while (f := _flock(path, exclusive)) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return f


def runner_active(runs_dir: str | Path) -> bool | None:
    """True while some `queue run` (any lane) works through this queue; None where the OS cannot tell."""
    if fcntl is None:
        return None
    path = queue_dir(runs_dir) / RUNNER_LOCK
    if not path.exists():
        return False
    f = _flock(path, exclusive=True)
    if f is None:
        return True
    f.close()
    return False


# ---- the loop -------------------------------------------------------------------------------------------------------

def run_queue(runs_dir: str | Path, gpus: str | None = None, webhooks: list[str] | None = None,
              desktop: bool = False, say=print, warn=None) -> int:
    """Run the queue (or one lane of it) until no job is left: 0, 1 if a job failed, INTERRUPTED after a stop."""
    lane = None if gpus is None else lane_of(gpus)
    control = Control(say=say, warn=warn, webhooks=list(webhooks or []), desktop=desktop)
    with runner_lock(runs_dir, lane), _sigterm_as_flag(control):
        named: set[str] = set()
        while not (control.stopping or control.stop_asked):
            _wait_while_a_run_trains_outside(runs_dir, lane, control)
            job, orphan, damaged = claim_next(runs_dir, lane)  # again before every job: moves and removes count
            for line in damaged:
                if line not in named:
                    named.add(line)
                    control.warning(f"warning: {line}")
            if job is None:
                return 1 if control.failed else 0
            _run_one(runs_dir, job, orphan, control)
    return INTERRUPTED


def _wait_while_a_run_trains_outside(runs_dir, lane: str | None, control: Control) -> None:
    """A training started outside the queue (the app's Start, `train`) between two jobs has the device: one device,
    one job, so the next job waits for it. (Lanes run on their own GPU sets: only the whole-queue runner waits.)"""
    from ..job import active_run  # (torch-free, but job.py is large: queue list and add need none of it)
    said = False
    while lane is None and not (control.stopping or control.stop_asked):
        busy = active_run(runs_dir)
        jobs, _ = read_queue(runs_dir)
        ours = {str(Path(j.run_dir).resolve()) for j in jobs if j.run_dir}
        if busy is None or str(busy.run_dir.resolve()) in ours or next_job(jobs, lane) is None:
            return
        if not said:
            control.say(f"waiting: run {busy.run_dir.name} is training, started outside the queue (one device, "
                        f"one job)")
            said = True
        time.sleep(1.0)


@contextmanager
def _sigterm_as_flag(control: Control):
    """SIGTERM (the app stopping the queue) stops the running job after its step, then the queue. The handler
    only sets a flag: raised as an exception it could land anywhere, between starting a child and waiting for it
    say, and leave that child running unstopped; the loops that wait act on the flag."""
    def handler(signum, frame):
        control.stop_asked = True
    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (a test, an embedding program): leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _run_one(runs_dir, job: QueueJob, orphan: bool, control: Control) -> None:
    control.say(f"job {job.id} ({job.kind} {job.name}): " + ("taken over from a runner that ended" if orphan
                                                              else "started"))
    try:
        _wait_for_child(job, control)  # a child that outlived a killed runner: let it end, never start a second
        if job.kind == "train":
            state, message, payload = _run_train(runs_dir, job, orphan, control)
        else:
            state, message, payload = _run_command(runs_dir, job, orphan, control)
    except (UserError, OSError) as e:  # its config no longer loads, a full disk while creating its run folder
        state, message, payload = "failed", str(e).splitlines()[0], {"run": job.name}
    control.failed += state == "failed"
    try:
        update_job(runs_dir, job.id, state=state, message=message, ended_at=time.time(), child_pid=0)
    except QueueError:
        pass  # removed while it ran (remove refuses a running job; a hand-deleted file): nothing to record
    control.say(f"job {job.id} ({job.kind} {job.name}): {state}" + (f": {message}" if message else ""))
    for line in notify_end({**payload, "state": state}, control.webhooks + _job_webhooks(job),
                           control.desktop or _job_desktop(job)):
        control.warning(line)


def _job_webhooks(job: QueueJob) -> list[str]:
    url = job.config.get("notify", {}).get("webhook_url", "") if job.kind == "train" else ""
    return [url] if isinstance(url, str) and url else []


def _job_desktop(job: QueueJob) -> bool:
    return job.kind == "train" and job.config.get("notify", {}).get("desktop") is True


# ---- training jobs --------------------------------------------------------------------------------------------------

def _run_train(runs_dir, job: QueueJob, orphan: bool, control: Control) -> tuple[str, str, dict]:
    run_dir = Path(job.run_dir) if job.run_dir and runs.is_run_dir(job.run_dir) else None
    cmd = None
    if run_dir is not None:
        if orphan and _last_attempt(run_dir)[1]:
            return _train_outcome(job, run_dir, None)  # it ended while no runner watched
        if runs.resumable_checkpoint(run_dir)[0] is not None:
            cmd = [sys.executable, "-m", "trainer", "train", "--resume", str(run_dir), "--quiet"]
            control.say(f"job {job.id}: resuming {run_dir.name} from its last checkpoint")
        elif not any(isinstance(e, Started) for e in tail_events(run_dir / "events.jsonl")):
            cmd = [sys.executable, "-m", "trainer.job", str(run_dir)]  # killed before its first step: same folder
    if cmd is None:
        cfg = C.from_dict(dict(job.config), source=f"job {job.id}")
        run_dir = runs.create_run_dir(cfg)  # a fresh, unique folder (mkdir is the claim), recorded before the child
        update_job(runs_dir, job.id, run_dir=str(run_dir))
        # trainer.job is the child the app's Start runs: unlike `train --config`, it trains a folder made here, so
        # the runner knows the folder before the child exists and a kill at any moment can be resumed
        cmd = [sys.executable, "-m", "trainer.job", str(run_dir)]
    rc = _spawn_and_wait(runs_dir, job, cmd, run_dir / "train.log", None, run_dir, control)
    return _train_outcome(job, run_dir, rc)


def _last_attempt(run_dir: Path) -> tuple[list, bool]:
    """(the events since the last Started, whether that attempt ended with a Finished or Failed event)."""
    events = tail_events(run_dir / "events.jsonl")
    starts = [i for i, e in enumerate(events) if isinstance(e, Started)]
    attempt = events[starts[-1]:] if starts else events
    return attempt, any(isinstance(e, (Finished, Failed)) for e in attempt)


def _train_outcome(job: QueueJob, run_dir: Path, rc: int | None) -> tuple[str, str, dict]:
    info = runs.run_info(run_dir)
    payload = {"run": run_dir.name, "adapter": str(info.adapter_path) if info.adapter_path else None,
               "best_val_loss": info.best_loss}
    if info.state == "finished":
        return "done", f"adapter {info.adapter_path}", payload
    if info.state == "stopped":
        return "stopped", f"stopped at step {info.step}; `python -m trainer queue resume {job.id}` continues it", \
            payload
    failures = [e for e in _last_attempt(run_dir)[0] if isinstance(e, Failed)]
    message = failures[-1].error if failures else last_line(run_dir / "train.log")
    if rc is not None and rc < 0:
        message = f"killed by signal {-rc}" + (f" (out of memory?); last output: {message}" if message else "")
    return "failed", message or f"the training process ended with exit code {rc}", payload


# ---- export / blend / caption jobs ---------------------------------------------------------------------------------

def _run_command(runs_dir, job: QueueJob, orphan: bool, control: Control) -> tuple[str, str, dict]:
    """`python -m trainer <argv>` in the folder it was added from; its output in queue/<id>.log. Each of these
    commands writes its file atomically, so one killed midway is simply run again."""
    log = queue_dir(runs_dir) / f"{job.id}.log"
    out = job.argv[job.argv.index("--out") + 1] if "--out" in job.argv[:-1] else None
    payload = {"run": job.name, "adapter": out, "best_val_loss": None}
    ended = orphan_command_outcome(runs_dir, job) if orphan else None
    if ended is not None:
        return (*ended, payload)
    rc = _spawn_and_wait(runs_dir, job, [sys.executable, "-m", "trainer", *job.argv], log, job.cwd or None, None,
                         control)
    if rc == 0:
        return "done", last_line(log), payload
    state = "stopped" if rc == INTERRUPTED or control.stopping else "failed"
    return state, last_line(log) or f"exit code {rc}", payload


def orphan_command_outcome(runs_dir, job: QueueJob) -> tuple[str, str] | None:
    """How a command that ran while its runner was killed ended, where its files tell: (state, message), or None
    to run it again. Its exit code is lost with the runner. An export or blend writes its --out file atomically, so
    a file written since the job started means it finished, and no such file means it did not (a run again writes
    it once). A captioning without --overwrite writes only the captions still missing, so running it again does
    the rest; with --overwrite, whether it wrote them all is unknown and the user decides."""
    if job.kind == "caption":
        if "--overwrite" not in job.argv:
            return None
        log = queue_dir(runs_dir) / f"{job.id}.log"
        return "failed", (f"its runner was killed while it ran, so whether it captioned every image is unknown (its "
                          f"output: {log}); `python -m trainer queue resume {job.id}` runs it again")
    if "--out" not in job.argv[:-1]:
        return None
    out = Path(job.cwd or ".") / job.argv[job.argv.index("--out") + 1]  # an absolute --out stays itself
    try:
        written = out.stat().st_mtime >= job.started_at - 1.0  # a second for coarse file-system clocks
    except OSError:
        return None
    return ("done", f"wrote {out} (it ended while no runner watched)") if written else None


# ---- the child ------------------------------------------------------------------------------------------------------

def child_alive(job: QueueJob) -> bool:
    """Whether the job's recorded child still runs. A pid alone is not enough: once that process ended, the OS may
    give its number to any other program, so where /proc exists the process must also be running this job (its
    command line after -m). Without /proc (macOS, Windows) the pid is all there is to go on."""
    if job.child_pid <= 0 or not pid_alive(job.child_pid):  # pid_alive: a zombie counts as ended
        return False
    if not os.path.isdir("/proc/self"):
        return True
    try:
        cmd = Path(f"/proc/{job.child_pid}/cmdline").read_bytes().decode("utf-8", "replace").split("\0")
    except OSError:  # it ended meanwhile
        return False
    if "-m" not in cmd[:-1]:
        return False
    module, args = cmd[cmd.index("-m") + 1], [a for a in cmd[cmd.index("-m") + 2:] if a]
    if job.kind == "train":  # trainer.job RUN_DIR, or train --resume RUN_DIR
        return module in ("trainer", "trainer.job") and bool(job.run_dir) and job.run_dir in args
    return module == "trainer" and args == job.argv


def _wait_for_child(job: QueueJob, control: Control) -> None:
    """Wait while a child of an earlier runner still runs this job: its recorded pid, and for a training the run's
    lock (held from the child's first second, so the pid covers only the moment before it), passing a SIGTERM's
    stop on to it."""
    run_dir = job.run_dir if job.kind == "train" and job.run_dir else None

    def busy() -> bool:
        return child_alive(job) or bool(run_dir and is_held(run_dir))
    if not busy():
        return
    control.say(f"job {job.id}: its process from before this runner started still runs; waiting for it")
    while busy():
        if control.stop_asked and not control.stopping:
            _pass_stop(job, run_dir, lambda: child_alive(job) and os.kill(job.child_pid, signal.SIGINT), control)
        time.sleep(POLL_S)


def _pass_stop(job: QueueJob, run_dir, interrupt, control: Control) -> None:
    """Stop the running job after its step (a training: its stop command; a command: a Ctrl+C), then the queue."""
    control.stopping = True
    control.say(f"stopping: job {job.id} stops after its current step, then the queue stops")
    if run_dir is not None:
        send_command(run_dir, "stop")
        return
    try:
        interrupt()
    except (OSError, ValueError):  # it ended meanwhile; ValueError: a signal this OS cannot send
        pass


def _spawn_and_wait(runs_dir, job: QueueJob, cmd: list[str], log: Path, cwd, run_dir, control: Control) -> int:
    """Run the child in the runner's process group (a Ctrl+C in the terminal reaches both; killing the group kills
    both), its output appended to `log`; wait for it, passing a stop on to it."""
    if run_dir is not None:
        runs.begin_attempt(run_dir)  # commands of an earlier attempt (a stop) must not stop this one
    with open(log, "ab") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd,
                                   env=child_env())
    try:
        update_job(runs_dir, job.id, child_pid=process.pid)
    except QueueError:
        pass  # its file deleted by hand meanwhile: the child still runs, and is waited for
    while True:
        if control.stop_asked and not control.stopping:  # a SIGTERM, perhaps before this child even existed
            _pass_stop(job, run_dir, lambda: process.send_signal(signal.SIGINT), control)
        try:
            return process.wait(timeout=POLL_S)
        except subprocess.TimeoutExpired:
            pass
        except KeyboardInterrupt:  # Ctrl+C in the terminal (the child got it too): stop after its step
            control.stop_asked = True


def last_line(path: Path) -> str:
    """The last non-empty line of a child's output (its error, on a failure), at most 500 characters."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 16384))
            lines = [ln.strip() for ln in f.read().decode("utf-8", errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:500] if lines else ""
