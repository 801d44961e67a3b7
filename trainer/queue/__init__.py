"""A persistent job queue in the runs folder: trainings, exports, blends and captionings run one after another (one
lane per GPU set), each in its own process, surviving restarts of the app and of the machine.

  store.py   the jobs on disk (one atomic JSON file each), add / move / remove / requeue
  runner.py  `queue run`: the loop, the child processes, resuming what a killed runner left, lanes
  notify.py  the webhook and the desktop notification when a job ends
  cli.py     the `python -m trainer queue ...` commands (registered by trainer/__main__.py)
"""
from __future__ import annotations

import sys
from pathlib import Path

from .. import config as C
from .. import runs
from ..events import send_command
from ..runlock import is_held
from .runner import lane_of, run_queue, runner_active
from .store import (COMMAND_KINDS, KINDS, STATES, QueueError, QueueJob, move_job, new_job, queue_dir,
                    read_queue, remove_job, requeue_job)

__all__ = ["COMMAND_KINDS", "KINDS", "STATES", "QueueError", "QueueJob", "list_queue", "move_job", "queue_command",
           "queue_dir", "queue_train", "remove_job", "resume_job", "run_queue", "runner_active", "runner_argv",
           "stop_job"]


def queue_train(cfg: C.TrainConfig, source: str | None = None, runs_dir: str | Path | None = None,
                argv: list[str] | None = None) -> QueueJob:
    """Check cfg as `train` does (trainer.check_config: a typo fails now, not at 3 a.m.) and queue it. The job keeps
    the resolved config (absolute folders), so it means the same whatever the working folder when it runs."""
    from ..job import check_config  # torch: only when a job is added
    check_config(cfg, source=source)
    resolved = runs.resolved_config(cfg)
    return new_job(runs_dir or cfg.saving.runs_dir, "train", cfg.run.name, config=C.to_dict(resolved),
                   argv=list(argv or []), lane=lane_of(cfg.distributed.gpus))


def queue_command(argv: list[str], runs_dir: str | Path, cwd: str | Path | None = None) -> QueueJob:
    """Queue `python -m trainer <argv>` (export, blend or caption), run from `cwd` (default: here). The caller
    checks the arguments parse (the CLI does, with the command's own parser)."""
    if not argv or argv[0] not in COMMAND_KINDS:
        raise QueueError(f"a queued command is one of: {', '.join(COMMAND_KINDS)} (then its arguments), not "
                         f"{' '.join(argv) or 'nothing'}; a training is queued with --config")
    out = argv[argv.index("--out") + 1] if "--out" in argv[:-1] else ""
    name = Path(out).name if out else argv[0]
    return new_job(runs_dir, argv[0], name, argv=list(argv), cwd=str(Path(cwd or Path.cwd()).resolve()))


def list_queue(runs_dir: str | Path) -> tuple[list[QueueJob], list[str]]:
    """(the jobs in queue order, one line per damaged job file naming it)."""
    return read_queue(runs_dir)


def _running_now(runs_dir):
    def running(job: QueueJob) -> bool:
        return bool(runner_active(runs_dir)) or bool(job.run_dir and is_held(job.run_dir))
    return running


def resume_job(runs_dir: str | Path, job_id: str) -> QueueJob:
    """Queue a stopped, failed or killed job again; a training resumes from its run's last checkpoint."""
    return requeue_job(runs_dir, job_id, _running_now(runs_dir))


def stop_job(runs_dir: str | Path, job_id: str) -> QueueJob:
    """Ask a running training job to stop after its step (it writes its adapter; the queue goes on)."""
    jobs, _ = read_queue(runs_dir)
    job = next((j for j in jobs if j.id == job_id), None)
    if job is None or job.state != "running" or job.kind != "train" or not job.run_dir:
        raise QueueError(f"job {job_id} is not a running training" + ("" if job else " (no such job)")
                         + "; `python -m trainer queue remove` takes a job that has not started")
    send_command(job.run_dir, "stop")
    return job


RUNNER_LOG = "queue-runner.log"  # beside the run folders: what a runner started by start_runner printed


def start_runner(runs_dir: str | Path, gpus: str | None = None):
    """Start `queue run` as its own process in its own session (it outlives the app and a Ctrl+C in its terminal,
    as a training started by start_run does), from any working folder, its output appended to RUNNER_LOG."""
    import subprocess
    from ..job import child_env
    folder = queue_dir(runs_dir).parent
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / RUNNER_LOG, "ab") as log:
        return subprocess.Popen(runner_argv(folder, gpus), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=child_env(), start_new_session=True)


def runner_argv(runs_dir: str | Path, gpus: str | None = None) -> list[str]:
    """The command that works through the queue in its own process (the app starts it, like a training)."""
    return [sys.executable, "-m", "trainer", "queue", "run", "--runs-dir", str(queue_dir(runs_dir).parent),
            *(["--gpus", gpus] if gpus is not None else [])]
