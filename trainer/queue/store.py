"""The queue on disk: <runs_dir>/queue/<id>.json, one JSON file per job, each written atomically (trainer.atomic).

Why files and not SQLite: a damaged file costs one job, named in one line, where a damaged database costs the whole
queue; a user can read, copy or delete one job with a file manager; and every other state loradesk keeps (run
folders, events.jsonl, checkpoints) is plain files with atomic writes, so one rule covers them all. What SQLite would
give, transactions over several jobs (a move renumbers many), comes from one short flock around each
read-modify-write (`editing`); the writes themselves are atomic, so a reader that takes no lock still never sees half
a file. Where the OS has no flock (Windows) the lock is skipped: there edits from two processes at the same instant
can lose one of them, never damage a file.
"""
from __future__ import annotations

import dataclasses
import json
import secrets
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .. import config as C
from ..atomic import write_json_atomic
from ..errors import UserError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

QUEUE_FOLDER = "queue"
EDIT_LOCK = ".edit.lock"
KINDS = ("train", "export", "blend", "caption")  # export/blend/caption run as `python -m trainer <argv>`
COMMAND_KINDS = KINDS[1:]
STATES = ("queued", "running", "done", "failed", "stopped")


@dataclass
class QueueJob:
    id: str
    kind: str
    name: str
    order: int
    state: str = "queued"
    config: dict = field(default_factory=dict)  # train: the resolved config (trainer.config.to_dict)
    argv: list = field(default_factory=list)  # command kinds: what runs after `python -m trainer`
    cwd: str = ""  # command kinds: the working folder their relative paths mean
    lane: str = ""  # the GPU set (distributed.gpus, normalised: "0,1"); "" = the default device
    message: str = ""  # why it failed or stopped, or what it wrote
    run_dir: str = ""  # train: its run folder, once created (a resume continues it)
    child_pid: int = 0  # the process running it: a runner that takes the job over waits while it lives
    added_at: float = 0.0
    started_at: float = 0.0
    ended_at: float = 0.0
    attempts: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class QueueError(UserError):
    """A queue operation that cannot be done (an unknown id, moving a running job, a busy queue)."""


def queue_dir(runs_dir: str | Path) -> Path:
    """The queue's folder: absolute, so a job means the same from any working folder."""
    return C.expand_path(str(runs_dir) or "runs").resolve() / QUEUE_FOLDER


def job_path(qdir: Path, job_id: str) -> Path:
    return qdir / f"{job_id}.json"


# ---- reading: every file may be damaged ----------------------------------------------------------------------------

def read_queue(runs_dir: str | Path) -> tuple[list[QueueJob], list[str]]:
    """(the jobs in queue order, one line per damaged job file naming it). Never raises for a file's content."""
    qdir = queue_dir(runs_dir)
    if not qdir.is_dir():
        return [], []
    jobs, damaged = [], []
    for path in sorted(qdir.glob("*.json")):
        if path.name.startswith("."):  # an atomic write's temporary file
            continue
        try:
            jobs.append(parse_job(path))
        except (OSError, ValueError) as e:
            damaged.append(f"damaged job file {path}: {e}; fix it or delete it (the other jobs go on)")
    jobs.sort(key=lambda j: (j.order, j.added_at, j.id))
    return jobs, damaged


def parse_job(path: Path) -> QueueJob:
    """One job file, checked field by field: a ValueError names what is wrong."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError("it is not text") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"it is not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(data, dict):
        raise ValueError("it holds no JSON object")
    kinds = {f.name: f.type for f in dataclasses.fields(QueueJob)}
    types = {"str": str, "int": int, "float": (int, float), "dict": dict, "list": list}
    for name, kind in kinds.items():
        if name in data and (isinstance(data[name], bool) or not isinstance(data[name], types[kind])):
            raise ValueError(f"its field {name!r} is not a {kind}")
    missing = [n for n in ("id", "kind", "name", "order", "state") if n not in data]
    if missing:
        raise ValueError(f"it has no {', '.join(missing)}")
    if data["kind"] not in KINDS or data["state"] not in STATES:
        raise ValueError(f"kind {data['kind']!r} / state {data['state']!r} is not one loradesk knows")
    if data["id"] != path.stem:
        raise ValueError(f"its id {data['id']!r} is not its file name")
    return QueueJob(**{k: v for k, v in data.items() if k in kinds})


def find_job(runs_dir: str | Path, job_id: str) -> QueueJob:
    jobs, _ = read_queue(runs_dir)
    for job in jobs:
        if job.id == job_id:
            return job
    raise QueueError(f"no job {job_id!r} in {queue_dir(runs_dir)}; `python -m trainer queue list` shows the ids")


def write_job(runs_dir: str | Path, job: QueueJob) -> None:
    write_json_atomic(job_path(queue_dir(runs_dir), job.id), job.to_dict())


# ---- changing: one read-modify-write at a time -----------------------------------------------------------------------

@contextmanager
def editing(runs_dir: str | Path):
    """Hold the queue's edit lock for one read-modify-write (milliseconds), so a move in the app and the runner
    marking a job done never undo each other."""
    qdir = queue_dir(runs_dir)
    qdir.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    with open(qdir / EDIT_LOCK, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # dropped when the file closes
        yield


def update_job(runs_dir: str | Path, job_id: str, **changes) -> QueueJob:
    """Re-read the job, apply the changes, write it back; a job removed meanwhile is a QueueError."""
    with editing(runs_dir):
        job = find_job(runs_dir, job_id)
        job = dataclasses.replace(job, **changes)
        write_job(runs_dir, job)
        return job


def new_job(runs_dir: str | Path, kind: str, name: str, **fields_) -> QueueJob:
    """Append a job at the end of the queue, with a fresh short id."""
    with editing(runs_dir):
        jobs, _ = read_queue(runs_dir)
        taken = {j.id for j in jobs}
        job_id = secrets.token_hex(3)
        while job_id in taken or job_path(queue_dir(runs_dir), job_id).exists():
            job_id = secrets.token_hex(3)
        order = max((j.order for j in jobs), default=0) + 1
        job = QueueJob(id=job_id, kind=kind, name=name, order=order, added_at=time.time(), **fields_)
        write_job(runs_dir, job)
        return job


def move_job(runs_dir: str | Path, job_id: str, to: int) -> list[QueueJob]:
    """Put a queued job at position `to` (1 = next to run) among the queued jobs; the queue in its new order."""
    with editing(runs_dir):
        jobs, _ = read_queue(runs_dir)
        job = next((j for j in jobs if j.id == job_id), None)
        if job is None:
            raise QueueError(f"no job {job_id!r} in the queue; `python -m trainer queue list` shows the ids")
        if job.state != "queued":
            raise QueueError(f"job {job_id} is {job.state}; only a queued job can move (`queue resume {job_id}` "
                             f"queues a stopped or failed one again)")
        waiting = [j for j in jobs if j.state == "queued" and j.id != job_id]
        waiting.insert(max(0, min(to - 1, len(waiting))), job)
        others = [j for j in jobs if j.state != "queued"]  # ran already: they keep the front
        for order, j in enumerate(others + waiting, start=1):
            if j.order != order:
                j.order = order
                write_job(runs_dir, j)
        return others + waiting


def next_job(jobs: list[QueueJob], lane: str | None) -> QueueJob | None:
    """A job left running by a killed runner first (it resumes), then the first queued job of the lane."""
    mine = [j for j in jobs if lane is None or j.lane == lane]
    return next((j for j in mine if j.state == "running"), None) or next((j for j in mine if j.state == "queued"),
                                                                        None)


def claim_next(runs_dir: str | Path, lane: str | None) -> tuple[QueueJob | None, bool, list[str]]:
    """Read the queue, pick the lane's next job and mark it running, all under the edit lock: a move rewrites
    several files one at a time, and a read between two of them would see two jobs with the same order and could
    pick the wrong one. (the claimed job or None, whether it was marked running already, i.e. left so by a killed
    runner, the damaged-file lines)."""
    with editing(runs_dir):
        jobs, damaged = read_queue(runs_dir)
        job = next_job(jobs, lane)
        if job is None:
            return None, False, damaged
        orphan = job.state == "running"
        job = dataclasses.replace(job, state="running", message="", attempts=job.attempts + 1,
                                  started_at=job.started_at if orphan else time.time())
        write_job(runs_dir, job)
        return job, orphan, damaged


def remove_job(runs_dir: str | Path, job_id: str) -> QueueJob:
    """Delete a job that is not running (its run folder, if any, is kept: it is the user's)."""
    with editing(runs_dir):
        job = find_job(runs_dir, job_id)
        if job.state == "running":
            raise QueueError(f"job {job_id} is running; stop its run first (the app's Stop, or `python -m trainer "
                             f"queue stop {job_id}`), then remove it")
        job_path(queue_dir(runs_dir), job_id).unlink(missing_ok=True)
        return job


def requeue_job(runs_dir: str | Path, job_id: str, running_now) -> QueueJob:
    """Queue a stopped, failed or killed job again; a training continues from its run's last checkpoint.
    `running_now(job)` says whether a job marked running really is (its process alive)."""
    with editing(runs_dir):
        job = find_job(runs_dir, job_id)
        if job.state == "queued":
            raise QueueError(f"job {job_id} is already queued")
        if job.state == "done":
            raise QueueError(f"job {job_id} is done; add it again to run it again (to train a finished run "
                             f"longer: python -m trainer train --resume {job.run_dir} --set schedule.max_steps=N)")
        if job.state == "running" and running_now(job):
            raise QueueError(f"job {job_id} is running")
        job = dataclasses.replace(job, state="queued", message="")
        write_job(runs_dir, job)
        return job
