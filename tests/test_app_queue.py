"""The app's queue (issue 27 item 4), handlers called directly: "Add to queue" queues the form's config as Start
would train it, the Queue tab lists the jobs, moves and removes them, starts the runner as its own process, and the
Train tab's live view follows the job that trains; a bad form is one line and queues nothing."""
import os
import signal
from pathlib import Path

import pytest

from tiny import wait_for
from app import forms as F
from app.errors import AppError
from app.settings import AppSettings
from app.tabs import queue as Q
from app.tabs import train as tab
from trainer import config as C
from trainer import list_queue, run_info, runner_active


@pytest.fixture
def settings(tmp_path, tiny_model_dir) -> AppSettings:
    return AppSettings(data_dir=tmp_path / "datasets", runs_dir=tmp_path / "runs", adapters_dir=tmp_path / "ad",
                       base_model=str(tiny_model_dir), import_dirs=(tmp_path,))


@pytest.fixture
def runners():
    """Kills what the test's Start the queue left running (the runner is its own session: its group goes)."""
    yield Q._runners
    for process in list(Q._runners):
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def form(settings: AppSettings, image_dir: Path, **changes) -> list:
    """The Train tab's values: the page's defaults with a few fields typed in (section__key=value)."""
    cfg = tab.initial_config(settings)
    values = dict(zip([i.key for i in F.form_fields()], F.config_to_values(cfg)))
    values.update({"dataset.path": str(image_dir), "dataset.resolution": 32, "network.rank": 2,
                   "network.alpha": 2.0, "dataset.cache_latents": "off", "sampling.every_n_steps": 0})
    values.update({k.replace("__", "."): v for k, v in changes.items()})
    return [values[i.key] for i in F.form_fields()] + F.encoder_values(cfg)


def names(settings: AppSettings) -> list[str]:
    return [row[4] for row in Q.queue_rows(settings)]


def test_add_to_queue_keeps_the_config_start_trains_and_the_panel_moves_and_removes(settings, image_dir):
    from trainer.runs import resolved_config
    values = form(settings, image_dir, run__name="first", schedule__max_steps=2)
    reply = tab.add_to_queue(settings, values)
    assert reply.startswith("Queued **first** as job ") and "number 1 of 1 waiting" in reply
    assert "Queue** tab" in reply  # no runner yet: the reply says where to start it
    tab.add_to_queue(settings, form(settings, image_dir, run__name="second", schedule__max_steps=3))
    jobs, damaged = list_queue(settings.runs_dir)
    assert not damaged and [j.name for j in jobs] == ["first", "second"]
    cfg, errors = tab.to_config(settings, values)  # what Start would hand to start_run
    assert not errors and jobs[0].config == C.to_dict(resolved_config(cfg))
    assert Path(jobs[0].config["saving"]["runs_dir"]) == settings.runs_dir.resolve()

    rows = Q.queue_rows(settings)
    assert [r[:5] for r in rows] == [["1", jobs[0].id, "queued", "train", "first"],
                                     ["2", jobs[1].id, "queued", "train", "second"]]
    assert "2 job(s) wait" in Q.queue_status(settings) and "not running" in Q.queue_status(settings)
    assert [value for _, value in Q.job_choices(settings)] == [jobs[0].id, jobs[1].id]
    Q.move(settings, jobs[0].id, +1)
    assert names(settings) == ["second", "first"]
    Q.move(settings, jobs[0].id, -1)
    Q.move(settings, jobs[0].id, -1)  # already first: stays
    assert names(settings) == ["first", "second"]
    assert Q.remove(settings, jobs[1].id).startswith(f"Removed job {jobs[1].id} (second)")
    assert names(settings) == ["first"]
    with pytest.raises(AppError, match="Pick a job first"):
        Q.remove(settings, None)
    with pytest.raises(Exception, match="is queued|already queued"):
        Q.resume(settings, jobs[0].id)
    with pytest.raises(Exception, match="not a running training"):
        Q.stop(settings, jobs[0].id)


def test_a_bad_form_is_one_line_and_queues_nothing(settings, image_dir, tmp_path):
    with pytest.raises(AppError) as bad:
        tab.add_to_queue(settings, form(settings, image_dir, network__rank=0))
    assert str(bad.value).startswith("Not queued: network.rank is 0") and "\n" not in str(bad.value)
    with pytest.raises(AppError, match="model.path") as missing:
        tab.add_to_queue(settings, form(settings, image_dir, model__path=str(tmp_path / "no-such-model")))
    assert "\n" not in str(missing.value)
    assert list_queue(settings.runs_dir) == ([], [])
    with pytest.raises(AppError, match="Nothing waits in the queue"):
        Q.start_queue(settings)


def test_the_queue_refresh_never_writes_the_picked_job_back(settings):
    from app.main import build_app
    demo = build_app(settings)
    ticks = [f for f in demo.fns.values() if any(ev == "tick" for _, ev in f.targets)
             and "queue-picker" in [getattr(o, "elem_id", None) for o in f.outputs]]
    assert len(ticks) == 1, "the queue panel is refreshed by a timer"
    out = dict(zip([getattr(o, "elem_id", None) for o in ticks[0].outputs], ticks[0].fn(None, None)))
    assert "choices" in out["queue-picker"] and "value" not in out["queue-picker"]
    assert out["queue-status"].startswith("The queue is not running")
    # a picked job that is gone (removed) is cleared, or the next button would send a value the list lacks
    out = dict(zip([getattr(o, "elem_id", None) for o in ticks[0].outputs], ticks[0].fn(None, "gone123")))
    assert out["queue-picker"]["value"] is None


def test_the_started_queue_runs_its_jobs_and_the_live_view_follows_the_one_that_trains(settings, image_dir,
                                                                                       runners):
    tab.add_to_queue(settings, form(settings, image_dir, run__name="short", schedule__max_steps=2))
    tab.add_to_queue(settings, form(settings, image_dir, run__name="long", schedule__max_steps=400))
    short, long = list_queue(settings.runs_dir)[0]
    assert Q.start_queue(settings).startswith("Started the queue")
    assert runner_active(settings.runs_dir), "Start the queue returns once the runner holds the queue"
    assert Q.start_queue(settings) == "The queue is already running."
    assert "The queue is running" in Q.queue_status(settings)

    def job(job_id):
        return next(j for j in list_queue(settings.runs_dir)[0] if j.id == job_id)
    wait_for(lambda: job(short.id).state == "done" and job(long.id).state == "running" and job(long.id).run_dir
             and tab.V.run_view(Path(job(long.id).run_dir)).step >= 1, what="the second job's first step")
    first, second = Path(job(short.id).run_dir), Path(job(long.id).run_dir)
    assert job(short.id).message.startswith("adapter ") and (first / "short.safetensors").is_file()
    rows = {r[1]: r for r in Q.queue_rows(settings)}
    assert rows[short.id][5] == "2/2" and rows[long.id][5].endswith("/400") and rows[long.id][2] == "running"
    # a page that followed the first job (it trained when the page loaded) now shows the queue's next one
    assert tab.live(settings, first.name)["run"] == second.name
    assert tab.live(settings, first.name, pinned=True)["run"] == first.name  # picked with Follow: it stays
    assert tab.live(settings, None)["state"] == "running"
    with pytest.raises(Exception, match="is running"):
        Q.remove(settings, long.id)
    with pytest.raises(Exception, match="only a queued job can move"):
        Q.move(settings, long.id, -1)

    assert "stops after its current step" in Q.stop(settings, long.id)
    wait_for(lambda: job(long.id).state == "stopped", what="the stop")
    wait_for(lambda: not runner_active(settings.runs_dir), what="the runner's end (nothing left)")
    stopped_at = run_info(second).step
    assert 1 <= stopped_at < 400 and "queue resume" in job(long.id).message
    assert Q.resume(settings, long.id).endswith("Press **Start the queue** to run it.")
    assert job(long.id).state == "queued" and job(long.id).run_dir == str(second)


def test_starting_the_queue_says_so_only_when_a_runner_holds_it(settings, image_dir, monkeypatch):
    """A runner that ends before it takes the queue (exit 1 here) is an error naming its exit and its last line,
    with no server path; not "Started the queue"."""
    import subprocess
    import sys
    tab.add_to_queue(settings, form(settings, image_dir, run__name="waits"))
    log = Path(settings.runs_dir) / "queue-runner.log"

    def failing(runs_dir, gpus=None):
        log.write_text(f"error: {Path(settings.runs_dir).resolve()}/queue: something went wrong\n")
        return subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(1)"])
    monkeypatch.setattr(Q, "start_runner", failing)
    with pytest.raises(AppError, match=r"could not start \(exit 1\): error: .*something went wrong") as e:
        Q.start_queue(settings, wait_s=10)
    assert str(Path(settings.runs_dir).resolve()) not in str(e.value)
