"""A training in its own process: the UI starts it, reads its events from the run folder and sends it commands.

The child is `python -m trainer train --run-dir DIR`; it owns the run folder, so a UI that restarts (or a second
browser tab) sees the same state by reading events.jsonl.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from . import config as C
from . import runs
from .events import Event, read_events, send_command


class JobError(RuntimeError):
    """A job that cannot start (another run is going, nothing to resume)."""


class Job:
    def __init__(self, run_dir: Path, process: subprocess.Popen | None = None):
        self.run_dir = Path(run_dir)
        self.process = process

    def events(self) -> list[Event]:
        return read_events(self.run_dir / "events.jsonl")

    def info(self) -> runs.RunInfo:
        return runs.run_info(self.run_dir)

    def state(self) -> str:
        return self.info().state

    def is_alive(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return self.state() == "running"

    def stop(self) -> None:
        send_command(self.run_dir, "stop")

    def save_now(self) -> None:
        send_command(self.run_dir, "save")

    def sample_now(self) -> None:
        send_command(self.run_dir, "sample")

    def wait(self, timeout: float | None = None) -> int:
        if self.process is None:
            raise JobError("this job was not started by this process; poll state() instead")
        return self.process.wait(timeout)


def active_job(runs_dir: str | Path) -> runs.RunInfo | None:
    """The run whose process is still alive, if any (one device, one job)."""
    for info in runs.list_runs(runs_dir):
        if info.state == "running":
            return info
    return None


def start_job(cfg: C.TrainConfig, resume: str | Path | None = None, env: dict | None = None) -> Job:
    """Validate, create (or reuse, for resume) the run folder and start the trainer process."""
    if resume is not None:
        run_dir = Path(resume)
        runs_dir = run_dir.parent
        runs.load_run_config(run_dir)
        if runs.run_info(run_dir).state == "running":
            raise JobError(f"{run_dir.name} is still running")
    else:
        C.check(cfg)
        runs_dir = Path(cfg.saving.runs_dir)
    busy = active_job(runs_dir)
    if busy is not None:
        raise JobError(f"run {busy.run_dir.name} is still training; stop it first (one device, one job)")
    if resume is None:
        run_dir = runs.create_run_dir(cfg)
    cmd = [sys.executable, "-m", "trainer", "train", "--run-dir", str(run_dir.resolve()), "--quiet"]
    if resume is not None:
        cmd.append("--resume")
    log = open(run_dir / "train.log", "ab")
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                               start_new_session=True)  # the run outlives a closed UI
    log.close()
    return Job(run_dir, process)
