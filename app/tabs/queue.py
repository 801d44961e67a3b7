"""Queue tab: the persistent job queue (trainer's RUNS_DIR/queue/) in order, with state, message and the running
job's progress; start the queue, move a job, remove, resume or stop one.

The queue is the engine's (trainer.list_queue and friends); this tab only shows it and passes buttons on. The runner
(`python -m trainer queue run`, trainer.start_runner) is its own process in its own session, like a training the
Train tab starts: the app may close and reopen and the queue goes on; runner_active tells a fresh page it runs.
Jobs are added from the Train tab ("Add to queue"); the Train tab's live view follows the job that trains.
"""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import gradio as gr

from trainer import (RUNNER_LOG, UserError, list_queue, move_job, remove_job, resume_job, run_info, runner_active,
                     start_runner, stop_job)

from ..datasets import short_message
from ..device import free_device, hold_device, release_models
from ..errors import AppError, guarded
from ..settings import AppSettings

HELP = ("### Queue\nJobs wait here in order and run one after another, each in its own process, even after the app "
        "or the computer restarts (the queue lives in the runs folder). Add a training with **Add to queue** in the "
        "Train tab, then press **Start the queue**; the Train tab's live view follows the job that trains. "
        "A stopped or failed job can be resumed from its last checkpoint.")
HEADERS = ["#", "job", "state", "kind", "name", "progress", "message"]
REFRESH_S = 3.0
RUNNER_START_S = 20.0  # a runner that has not taken the queue's lock by then is reported as still starting
_runners: list[subprocess.Popen] = []  # the runners this app started: polled, so none is left a zombie


# ----------------------------------------------------------------------------------------------------------------
# handlers: plain values in, plain values out

def queue_rows(settings: AppSettings) -> list[list[str]]:
    """One row per job, in queue order: position, id, state, kind, name, progress (step/total), message."""
    jobs, _ = list_queue(settings.runs_dir)
    return [[str(n), job.id, job.state, job.kind, job.name, progress_text(job), job.message]
            for n, job in enumerate(jobs, start=1)]


def progress_text(job) -> str:
    """A training job's step/total from its run folder's events (as the live view reads them); "" before its run
    exists and for the other kinds (they have no steps)."""
    if job.kind != "train" or not job.run_dir:
        return ""
    try:
        info = run_info(job.run_dir)
    except (UserError, OSError):  # its folder removed by hand: the job's own state and message still show
        return ""
    if not info.total_steps:
        return "loading" if job.state == "running" else ""
    return f"{info.step}/{info.total_steps}"


def queue_status(settings: AppSettings) -> str:
    """The line above the table: whether a runner works through the queue, what waits, and any damaged file."""
    _runners[:] = [p for p in _runners if p.poll() is None]
    jobs, damaged = list_queue(settings.runs_dir)
    waiting = sum(j.state == "queued" for j in jobs)
    active = runner_active(settings.runs_dir)
    if active:
        line = f"The queue is running; {waiting} job(s) wait."
    elif active is None:
        line = f"{waiting} job(s) wait (this system cannot tell whether a queue runner is working)."
    else:
        line = (f"The queue is not running; {waiting} job(s) wait: press **Start the queue**." if waiting
                else "The queue is not running and no job waits.")
    return "\n\n".join([line, *[f"⚠ {d}" for d in damaged]])


def job_choices(settings: AppSettings) -> list[tuple[str, str]]:
    """(label, id) for the job picker."""
    jobs, _ = list_queue(settings.runs_dir)
    return [(f"{n}. {j.name} ({j.kind}, {j.state}) {j.id}", j.id) for n, j in enumerate(jobs, start=1)]


def start_queue(settings: AppSettings, wait_s: float = RUNNER_START_S) -> str:
    """Start `python -m trainer queue run` as its own process (a closed app leaves it running), with the device
    freed of the app's models as Start frees it, and wait until it holds the queue's lock; its output goes to
    RUNS_DIR/queue-runner.log. (A run trained outside the queue makes the runner wait: the engine's rule.)"""
    runs_dir = Path(settings.runs_dir)
    if runner_active(runs_dir):
        return "The queue is already running."
    jobs, _ = list_queue(runs_dir)
    if not any(j.state in ("queued", "running") for j in jobs):
        raise AppError("Nothing waits in the queue: add a training with **Add to queue** in the Train tab first.")
    if not hold_device():
        raise AppError("Images are being generated; start the queue when they are done (one device, one job).")
    try:
        process = _spawn_runner(runs_dir)
        release_models()  # its trainings get the device memory the Generate and caption models held
    finally:
        free_device()
    deadline = time.monotonic() + wait_s
    while not runner_active(runs_dir) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if runner_active(runs_dir):
        return "Started the queue: its jobs run one after another, also when this page or the app is closed."
    last = short_message(runs_dir, _last_line(runs_dir / RUNNER_LOG))
    if process.poll() is None:
        raise AppError(f"The queue is still starting ({last}); see {RUNNER_LOG} in the runs folder.")
    raise AppError(f"The queue could not start (exit {process.poll()}): {last} (see {RUNNER_LOG} in the runs "
                   f"folder)")


def _spawn_runner(runs_dir: Path) -> subprocess.Popen:
    process = start_runner(runs_dir)  # its own session: a closed app or a Ctrl+C in its terminal leaves it running
    _runners.append(process)
    return process


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "it printed nothing"
    return lines[-1][:300] if lines else "it printed nothing"


def move(settings: AppSettings, job_id: str | None, step: int) -> str:
    """Move a queued job one place earlier (step -1) or later (+1) among the queued jobs."""
    job_id = _picked(job_id)
    jobs, _ = list_queue(settings.runs_dir)
    waiting = [j.id for j in jobs if j.state == "queued"]
    # a job that is not queued gets move_job's own message (it names the state and what to do)
    position = waiting.index(job_id) + 1 + step if job_id in waiting else 1
    move_job(settings.runs_dir, job_id, max(1, position))
    return f"Moved job {job_id}."


def remove(settings: AppSettings, job_id: str | None) -> str:
    job = remove_job(settings.runs_dir, _picked(job_id))
    return f"Removed job {job.id} ({job.name})" + ("; its run folder is kept." if job.run_dir else ".")


def resume(settings: AppSettings, job_id: str | None) -> str:
    job = resume_job(settings.runs_dir, _picked(job_id))
    then = "" if runner_active(settings.runs_dir) else " Press **Start the queue** to run it."
    return f"Job {job.id} ({job.name}) is queued again" + (", from its last checkpoint." if job.run_dir else ".") + \
        then


def stop(settings: AppSettings, job_id: str | None) -> str:
    job = stop_job(settings.runs_dir, _picked(job_id))
    return f"Job {job.id} ({job.name}) stops after its current step and keeps its adapter; the queue goes on."


def _picked(job_id: str | None) -> str:
    if not job_id:
        raise AppError("Pick a job first (click its row, or choose it under Job).")
    return job_id


# ----------------------------------------------------------------------------------------------------------------
# layout and wiring

def build(settings: AppSettings, demo: gr.Blocks) -> None:
    s = settings
    gr.Markdown(HELP)
    status = gr.Markdown(queue_status(s), elem_id="queue-status")
    table = gr.Dataframe(queue_rows(s), headers=HEADERS, interactive=False, elem_id="queue-table", max_height=360,
                         wrap=True)
    with gr.Row():
        picked = gr.Dropdown(job_choices(s), value=None, label="Job", elem_id="queue-picker", scale=3,
                             info="The job the buttons act on (or click its row).")
        start_btn = gr.Button("Start the queue", variant="primary", elem_id="queue-start-btn", scale=1)
    with gr.Row():
        buttons = {name: gr.Button(label, size="sm", elem_id=f"queue-{name}-btn") for name, label in
                   (("up", "Move up"), ("down", "Move down"), ("remove", "Remove"), ("resume", "Resume"),
                    ("stop", "Stop job"))}
    reply = gr.Markdown(elem_id="queue-reply")
    shown = gr.State(None)
    timer = gr.Timer(REFRESH_S)
    _wire(s, demo, status, table, picked, shown, timer, start_btn, buttons, reply)


def _wire(s, demo, status, table, picked, shown, timer, start_btn, buttons, reply) -> None:
    def refresh(before, chosen):
        # choices only, and nothing when nothing changed: a tick that wrote the picked value back could undo a
        # pick made while it was in flight (as the Train tab's runs list learned); a picked job that is gone (removed)
        # is cleared, or the next button would send a value the list no longer has
        now = (queue_status(s), queue_rows(s), job_choices(s))
        if now == before:
            return gr.skip(), gr.skip(), gr.skip(), before
        gone = chosen is not None and chosen not in {job_id for _, job_id in now[2]}
        return now[0], now[1], gr.update(choices=now[2], **({"value": None} if gone else {})), now

    listing = [status, table, picked, shown]
    timer.tick(refresh, [shown, picked], listing, show_progress="hidden")
    demo.load(refresh, [shown, picked], listing, show_progress="hidden")

    def on_row(evt: gr.SelectData):
        row = evt.row_value or []
        return row[1] if len(row) > 1 else gr.skip()
    table.select(on_row, None, [picked], show_progress="hidden")

    start_btn.click(guarded(lambda: start_queue(s), reply, reply), None, reply, concurrency_limit=1).then(
        refresh, [shown, picked], listing, show_progress="hidden")
    actions = {"up": lambda j: move(s, j, -1), "down": lambda j: move(s, j, +1), "remove": lambda j: remove(s, j),
               "resume": lambda j: resume(s, j), "stop": lambda j: stop(s, j)}
    for name, button in buttons.items():
        button.click(guarded(actions[name], reply, reply), [picked], reply, concurrency_limit=1).then(
            refresh, [shown, picked], listing, show_progress="hidden")
