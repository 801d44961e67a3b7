"""The job queue (issue 27): jobs added through the CLI run in order, each in its own process; a failure is recorded
and the next job starts; a killed runner resumes its job from the checkpoint and runs the rest once; moves and
removes made while a job runs decide what runs next; damaged job files are named; a webhook hears each end."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from trainer import list_queue, move_job, remove_job, resume_job, run_queue, runner_argv, stop_job
from trainer.__main__ import main
from trainer.events import Finished, Started, read_events
from trainer.queue import QueueError
from trainer.queue.notify import desktop_command, notify_end
from trainer.queue.runner import _job_webhooks, next_job, runner_lock
from trainer.queue.store import QueueJob, new_job, update_job
from trainer.runlock import is_held
from trainer.runs import checkpoint_dirs

ROOT = Path(__file__).resolve().parent.parent
BASE = ["dataset.resolution=32", "dataset.batch_size=2", "network.rank=4", "saving.dtype=fp32"]


def add_args(model_dir, data_dir, runs_dir, *extra):
    out = ["queue", "add"]
    for item in [f"model.path={model_dir}", f"dataset.path={data_dir}", f"saving.runs_dir={runs_dir}", *BASE, *extra]:
        out += ["--set", item]
    return out


def add(capsys, *args) -> str:
    assert main(list(args)) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert out.startswith("queued "), out
    return out.split()[1].rstrip(":")


def jobs_by_id(runs_dir):
    jobs, damaged = list_queue(runs_dir)
    assert not damaged, damaged
    return {j.id: j for j in jobs}


def wait_for(predicate, timeout=120.0):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.1)
    return False


class Hook(BaseHTTPRequestHandler):
    posts: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Hook.posts.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def webhook():
    Hook.posts = []
    server = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", Hook.posts
    server.shutdown()


# ---- end to end, through the CLI ---------------------------------------------------------------------------------

def test_three_jobs_run_in_order_and_a_failure_is_recorded(tiny_model_dir, image_dir, tmp_path, capsys, webhook):
    runs = tmp_path / "runs"
    doomed = shutil.copytree(tiny_model_dir, tmp_path / "doomed-model")
    first = add(capsys, *add_args(tiny_model_dir, image_dir, runs, "schedule.max_steps=2"), "--name", "same")
    assert main(add_args(tmp_path / "no-such-model", image_dir, runs)) == 2  # the bad path is caught at add
    assert "model.path" in capsys.readouterr().err
    failing = add(capsys, *add_args(doomed, image_dir, runs, "schedule.max_steps=2"), "--name", "gone")
    last = add(capsys, *add_args(tiny_model_dir, image_dir, runs, "schedule.max_steps=2"), "--name", "same")
    shutil.rmtree(doomed)  # fails only when it runs
    url, posts = webhook

    assert main(["queue", "run", "--runs-dir", str(runs), "--webhook", url]) == 1  # 1: a job failed
    jobs = jobs_by_id(runs)
    assert [jobs[i].state for i in (first, failing, last)] == ["done", "failed", "done"]
    assert "doomed-model" in jobs[failing].message, jobs[failing].message
    assert jobs[first].ended_at <= jobs[failing].started_at and jobs[failing].ended_at <= jobs[last].started_at
    a, c = Path(jobs[first].run_dir), Path(jobs[last].run_dir)
    assert a != c and a.name.startswith("same-") and c.name.startswith("same-")  # same name, two folders
    assert (a / "same.safetensors").is_file() and (c / "same.safetensors").is_file()
    assert [(p["run"], p["state"]) for p in posts] == [(a.name, "done"), (Path(jobs[failing].run_dir).name, "failed"),
                                                       (c.name, "done")]
    assert posts[0]["adapter"] == str(a / "same.safetensors") and "best_val_loss" in posts[0]
    assert main(["queue", "list", "--runs-dir", str(runs)]) == 0
    listed = capsys.readouterr().out
    assert listed.index(first) < listed.index(failing) < listed.index(last) and "failed" in listed


def test_a_killed_runner_resumes_its_job_from_the_checkpoint_and_runs_the_rest_once(tiny_model_dir, image_dir,
                                                                                    tmp_path, capsys):
    runs = tmp_path / "runs"
    long = add(capsys, *add_args(tiny_model_dir, image_dir, runs, "schedule.max_steps=120",
                                 "saving.every_n_steps=5", "run.name=long"))
    rest = [add(capsys, *add_args(tiny_model_dir, image_dir, runs, "schedule.max_steps=2", f"run.name=r{i}"))
            for i in range(2)]
    cmd = [sys.executable, "-m", "trainer", "queue", "run", "--runs-dir", str(runs)]
    runner = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              start_new_session=True)  # its own process group: the runner and its child
    try:
        def checkpointed():
            run_dir = jobs_by_id(runs)[long].run_dir
            return bool(run_dir) and bool(checkpoint_dirs(run_dir))
        assert wait_for(checkpointed), runner.stderr.read1().decode() if runner.poll() is not None else "no checkpoint"
    finally:
        os.killpg(runner.pid, signal.SIGKILL)
        runner.wait()
    run_dir = Path(jobs_by_id(runs)[long].run_dir)
    assert wait_for(lambda: not is_held(run_dir), 30)  # the kernel dropped the killed child's lock
    killed_at = checkpoint_dirs(run_dir)[-1]
    assert jobs_by_id(runs)[long].state == "running" and not (run_dir / "long.safetensors").exists()

    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    jobs = jobs_by_id(runs)
    assert [jobs[i].state for i in (long, *rest)] == ["done"] * 3
    assert jobs[long].run_dir == str(run_dir) and jobs[long].attempts == 2
    starts = [e for e in read_events(run_dir / "events.jsonl") if isinstance(e, Started)]
    assert [s.start_step for s in starts][0] == 0 and starts[1].start_step >= int(killed_at.name.split("-")[1]) > 0
    assert (run_dir / "long.safetensors").is_file()
    assert [jobs[i].attempts for i in rest] == [1, 1]  # nothing ran twice: three run folders in all
    assert sorted(p.name.split("-")[0] for p in runs.iterdir() if p.name != "queue") == ["long", "r0", "r1"]


def test_a_child_that_outlives_its_killed_runner_is_waited_for_not_run_again(tiny_model_dir, image_dir, tmp_path,
                                                                             capsys):
    runs = tmp_path / "runs"
    job = add(capsys, *add_args(tiny_model_dir, image_dir, runs, "schedule.max_steps=60", "run.name=orphan"))
    cmd = [sys.executable, "-m", "trainer", "queue", "run", "--runs-dir", str(runs)]
    runner = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        assert wait_for(lambda: bool(jobs_by_id(runs)[job].run_dir) and is_held(jobs_by_id(runs)[job].run_dir))
    finally:
        runner.kill()  # the runner alone: its child trains on
        runner.wait()
    run_dir = Path(jobs_by_id(runs)[job].run_dir)
    assert is_held(run_dir)
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "waiting for it" in done.stdout, done.stdout + done.stderr
    assert jobs_by_id(runs)[job].state == "done"
    assert len([e for e in read_events(run_dir / "events.jsonl") if isinstance(e, Started)]) == 1  # not rerun
    assert [p.name for p in runs.iterdir() if p.name != "queue"] == [run_dir.name]


def test_moves_and_removes_while_a_job_runs_change_what_runs_next(tiny_model_dir, image_dir, tmp_path, capsys):
    runs = tmp_path / "runs"
    ids = [add(capsys, *add_args(tiny_model_dir, image_dir, runs, f"schedule.max_steps={30 if i == 0 else 2}",
                                 f"run.name=j{i}")) for i in range(4)]
    said = []
    thread = threading.Thread(target=lambda: said.append(run_queue(runs, say=said.append)))
    thread.start()
    try:
        assert wait_for(lambda: jobs_by_id(runs)[ids[0]].state == "running")
        assert jobs_by_id(runs)[ids[0]].ended_at == 0  # still running: these edits come while it runs
        move_job(runs, ids[3], 1)
        remove_job(runs, ids[1])
    finally:
        thread.join(300)
    assert said[-1] == 0
    jobs = jobs_by_id(runs)
    assert ids[1] not in jobs
    ran = sorted((jobs[i].started_at, i) for i in (ids[0], ids[2], ids[3]))
    assert [i for _, i in ran] == [ids[0], ids[3], ids[2]]
    assert all(jobs[i].state == "done" for i in (ids[0], ids[2], ids[3]))
    assert not any(p.name.startswith("j1-") for p in runs.iterdir())


# ---- fast checks: no training --------------------------------------------------------------------------------------

def test_a_typo_fails_at_add_with_one_line_and_nothing_is_queued(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert main(["queue", "add", "--set", f"saving.runs_dir={runs}", "--set", "network.rnak=4"]) == 2
    err = capsys.readouterr().err
    assert "network.rnak" in err and "network.rank" in err and "Traceback" not in err
    assert main(["queue", "add", "--runs-dir", str(runs), "export", "x", "--out", "y.safetensors", "--bogus"]) == 2
    assert "--bogus" in capsys.readouterr().err
    assert main(["queue", "add", "--runs-dir", str(runs), "generate", "--prompt", "p", "--out", "x.png"]) == 2
    assert "cannot be queued" in capsys.readouterr().err
    assert list_queue(runs) == ([], [])


def test_damaged_job_files_are_named_and_the_rest_go_on(tmp_path, capsys):
    runs = tmp_path / "runs"
    good = add(capsys, "queue", "add", "--runs-dir", str(runs), "export", str(tmp_path / "missing"), "--out",
               str(tmp_path / "x.safetensors"))
    qdir = runs / "queue"
    bad = {"torn.json": b'{"id": "torn", "kind"', "list.json": b"[1, 2]", "binary.json": b"\xff\xfe\x00",
           "typed.json": json.dumps({"id": "typed", "kind": "train", "name": "x", "order": "first",
                                     "state": "queued"}).encode()}
    for name, data in bad.items():
        (qdir / name).write_bytes(data)
    assert main(["queue", "list", "--runs-dir", str(runs)]) == 0
    captured = capsys.readouterr()
    for name in bad:
        assert sum(name in line for line in captured.err.splitlines()) == 1, captured.err
    assert good in captured.out
    assert main(["queue", "run", "--runs-dir", str(runs)]) == 1  # the export fails (no such run), the rest is named
    captured = capsys.readouterr()
    assert all(name in captured.err for name in bad)
    jobs, damaged = list_queue(runs)
    assert [j.state for j in jobs] == ["failed"] and "missing does not exist" in jobs[0].message
    assert len(damaged) == 4


def test_queue_edits_keep_their_rules(tmp_path):
    runs = tmp_path / "runs"
    a, b, c = (new_job(runs, "export", n, argv=["export", n, "--out", "o"]) for n in "abc")
    assert [j.id for j in move_job(runs, c.id, 1)] == [c.id, a.id, b.id]
    assert [j.id for j in move_job(runs, c.id, 99)] == [a.id, b.id, c.id]  # past the end: last
    update_job(runs, a.id, state="done")
    with pytest.raises(QueueError, match="only a queued job can move"):
        move_job(runs, a.id, 2)
    with pytest.raises(QueueError, match="is done"):
        resume_job(runs, a.id)
    update_job(runs, b.id, state="running")
    with pytest.raises(QueueError, match="is running"):
        remove_job(runs, b.id)
    assert resume_job(runs, b.id).state == "queued"  # marked running, but no runner lives: a killed job
    with pytest.raises(QueueError, match="no job"):
        remove_job(runs, "nope")
    with pytest.raises(QueueError, match="not a running training"):
        stop_job(runs, c.id)
    remove_job(runs, c.id)
    assert [j.id for j in list_queue(runs)[0]] == [a.id, b.id]
    assert runner_argv(runs, "0,1")[-4:] == ["--runs-dir", str(runs.resolve()), "--gpus", "0,1"]


def test_one_runner_per_lane_and_lanes_pick_their_own_jobs(tmp_path):
    runs = tmp_path / "runs"
    with runner_lock(runs, None):
        with pytest.raises(QueueError, match="already works through"):
            run_queue(runs)
        with pytest.raises(QueueError, match="already works through"):
            run_queue(runs, gpus="0")
    with runner_lock(runs, "0,1"):
        with runner_lock(runs, "2"):  # another GPU set: a second lane runs beside it
            with pytest.raises(QueueError, match="lane --gpus 0,1"):
                run_queue(runs, gpus="0, 1")
            with pytest.raises(QueueError):
                run_queue(runs)  # every lane: not while lanes run
    a = new_job(runs, "export", "a", argv=["export"], lane="0,1")
    b = new_job(runs, "export", "b", argv=["export"])
    jobs = list_queue(runs)[0]
    assert next_job(jobs, "0,1").id == a.id and next_job(jobs, "").id == b.id and next_job(jobs, None).id == a.id
    update_job(runs, b.id, state="running")  # left running by a killed runner: taken first
    assert next_job(list_queue(runs)[0], None).id == b.id


def test_notifications_never_fail_the_queue(tmp_path, monkeypatch, webhook):
    url, posts = webhook
    payload = {"run": "r", "state": "done", "adapter": "/x.safetensors", "best_val_loss": 0.5}
    assert notify_end(payload, [url, url], desktop=False) == []
    assert posts == [payload]  # each URL once
    warnings = notify_end(payload, ["http://127.0.0.1:9/closed"], desktop=False)
    assert len(warnings) == 1 and "127.0.0.1:9" in warnings[0] and "goes on" in warnings[0]
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert notify_end(payload, [], desktop=True) == []  # no notifier: skipped silently
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    for system in ("Darwin", "Windows"):
        cmd, env = desktop_command('"; rm -rf ~ #', "text", system)
        assert "rm -rf" not in " ".join(cmd) and env["LORADESK_TITLE"] == '"; rm -rf ~ #'
    assert desktop_command("t", "x", "Linux")[0] == ["notify-send", "--app-name=loradesk", "t", "x"]
    train = QueueJob(id="a", kind="train", name="a", order=1, config={"notify": {"webhook_url": url}})
    assert _job_webhooks(train) == [url]  # a job's own notify.webhook_url, beside the runner's --webhook


# ---- review findings: nothing runs twice, edits never race the runner, stops land ----------------------------------

# A stand-in for a child that outlived its killed runner: `python -c SCRIPT -m trainer ...` has the command line the
# runner checks (its arguments after -m), and does what the real one would, slower
WRITES_OUT = "import pathlib, sys, time; time.sleep(1.5); pathlib.Path(sys.argv[-1]).write_bytes(b'adapter')"
TRAINS_LATE = """import sys, time
from trainer.events import EventLog, Finished, Started
from trainer.runlock import holding
time.sleep(1.5)  # Python still starting: the run's lock not taken yet
run_dir = sys.argv[-1]
with holding(run_dir):
    log = EventLog(run_dir + '/events.jsonl')
    log(Started(run_dir=run_dir, total_steps=2))
    log(Finished(step=2, adapter_path=run_dir + '/window.safetensors'))
"""


def outlived(script, *argv) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def test_a_command_whose_runner_was_killed_is_waited_for_not_started_again(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "out.safetensors"
    argv = ["export", str(tmp_path / "run"), "--out", str(out)]
    job = new_job(runs, "export", out.name, argv=argv, cwd=str(tmp_path))
    child = outlived(WRITES_OUT, "-m", "trainer", *argv)
    try:
        update_job(runs, job.id, state="running", started_at=time.time(), child_pid=child.pid)
        said = []
        assert run_queue(runs, say=said.append) == 0, said
        assert child.poll() is not None  # waited for: it ended before the runner recorded the job
    finally:
        child.kill()
        child.wait()
    done = jobs_by_id(runs)[job.id]
    assert done.state == "done" and str(out) in done.message, done
    assert any("waiting for it" in line for line in said), said
    assert not (runs / "queue" / f"{job.id}.log").exists()  # no second child was started


def test_a_recorded_child_counts_only_while_it_is_ours(tmp_path):
    from trainer.queue.runner import child_alive, orphan_command_outcome
    runs = tmp_path / "runs"
    out = tmp_path / "o.safetensors"
    job = new_job(runs, "export", "o", argv=["export", "r", "--out", str(out)], cwd=str(tmp_path))
    child = outlived("import time; time.sleep(30)", "-m", "trainer", *job.argv)
    try:
        assert child_alive(update_job(runs, job.id, child_pid=child.pid))
        if Path("/proc/self/cmdline").exists():  # the pid given to another program (here: pytest) is not ours
            assert not child_alive(update_job(runs, job.id, child_pid=os.getpid()))
    finally:
        child.kill()
        child.wait()
    assert not child_alive(update_job(runs, job.id, child_pid=child.pid))
    job = update_job(runs, job.id, started_at=time.time() - 5)
    assert orphan_command_outcome(runs, job) is None  # no output: it ran again (each command writes atomically)
    out.write_bytes(b"x")
    assert orphan_command_outcome(runs, job)[0] == "done"
    caption = new_job(runs, "caption", "caption", argv=["caption", "d", "--model", "m"], cwd=str(tmp_path))
    assert orphan_command_outcome(runs, caption) is None  # it writes only the captions still missing
    caption = new_job(runs, "caption", "caption", argv=["caption", "d", "--model", "m", "--overwrite"])
    state, message = orphan_command_outcome(runs, caption)
    assert state == "failed" and f"queue resume {caption.id}" in message and f"{caption.id}.log" in message


def test_a_training_child_killed_runner_left_before_it_took_the_run_lock_is_waited_for(tiny_model_dir, image_dir,
                                                                                      tmp_path, capsys):
    from trainer import config as C
    from trainer.runs import create_run_dir
    runs = tmp_path / "runs"
    job_id = add(capsys, *add_args(tiny_model_dir, image_dir, runs, "schedule.max_steps=2", "run.name=window"))
    run_dir = create_run_dir(C.from_dict(jobs_by_id(runs)[job_id].config))
    child = outlived(TRAINS_LATE, "-m", "trainer.job", str(run_dir))  # started; no lock, no event yet
    try:
        update_job(runs, job_id, state="running", run_dir=str(run_dir), started_at=time.time(), child_pid=child.pid)
        said = []
        assert run_queue(runs, say=said.append) == 0, said
    finally:
        child.kill()
        child.wait()
    assert child.returncode == 0  # it trained undisturbed (a second child would have taken its lock)
    job = jobs_by_id(runs)[job_id]
    assert job.state == "done" and "window.safetensors" in job.message, job
    assert not (run_dir / "train.log").exists()  # the runner started no child of its own


def test_a_move_while_the_runner_picks_its_next_job_is_seen_whole(tmp_path, monkeypatch):
    from trainer.queue import runner
    from trainer.queue.store import editing, write_job
    runs = tmp_path / "runs"
    a, b, c = (new_job(runs, "export", n, argv=["export", n, "--out", "o"]) for n in "abc")
    ran = []
    monkeypatch.setattr(runner, "_run_command",
                        lambda runs_dir, job, orphan, control: (ran.append(job.id) or "done", "", {"run": job.name}))
    thread = threading.Thread(target=lambda: run_queue(runs, say=lambda line: None))
    with editing(runs):  # a move of c to the front, caught between its writes: c and a both first
        c.order = 1
        write_job(runs, c)
        thread.start()
        time.sleep(0.5)  # the runner reads the queue now, unless it waits for the edit lock
        for order, job in ((2, a), (3, b)):
            job.order = order
            write_job(runs, job)
    thread.join(30)
    assert ran == [c.id, a.id, b.id]


def test_a_sigterm_between_starting_a_child_and_waiting_for_it_stops_the_child(tmp_path, monkeypatch):
    assert threading.current_thread() is threading.main_thread()  # else run_queue leaves SIGTERM alone: fatal here
    runs = tmp_path / "runs"
    first, second = (new_job(runs, "export", n, argv=["export", n, "--out", str(tmp_path / n)]) for n in "ab")
    real_popen, children = subprocess.Popen, []

    def popen(cmd, **kwargs):  # a child that stops on SIGINT (as a command does), then SIGTERM at the worst moment
        children.append(real_popen([sys.executable, "-c", "import signal, sys, time; signal.signal(signal.SIGINT, "
                                    "lambda *a: sys.exit(130)); time.sleep(60)"], **kwargs))
        os.kill(os.getpid(), signal.SIGTERM)
        return children[-1]
    monkeypatch.setattr(subprocess, "Popen", popen)
    try:
        code = run_queue(runs, say=lambda line: None)
    except KeyboardInterrupt:
        pytest.fail("the SIGTERM escaped the runner; its child was left running")
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
            child.wait()
    assert code == 130 and children[0].returncode != 0  # told to stop (maybe while Python started), it ended
    jobs = jobs_by_id(runs)
    assert jobs[first.id].state == "stopped" and jobs[second.id].state == "queued"


def test_queue_add_names_the_folder_and_how_to_run_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    export = ["export", str(tmp_path / "r"), "--out", str(tmp_path / "o.safetensors")]
    add(capsys, "queue", "add", *export)
    assert main(["queue", "add", *export]) == 0
    out = capsys.readouterr().out
    assert f"in {tmp_path / 'runs' / 'queue'}" in out and "--runs-dir" not in out  # the default: `queue run` finds it
    other = tmp_path / "other runs"
    assert main(["queue", "add", "--runs-dir", str(other), *export]) == 0
    out = capsys.readouterr().out
    assert f"in {other / 'queue'}" in out and f"python -m trainer queue run --runs-dir '{other}'" in out, out


def test_the_queue_waits_for_a_run_started_outside_it_and_starts_from_any_folder(tiny_model_dir, image_dir,
                                                                                   tmp_path, capsys, monkeypatch):
    """Start (the app) or `train` began a training between two queued jobs: one device, one job, so the queue's
    next job waits for it. start_runner launches the runner as its own process from any working folder."""
    from trainer import TrainConfig, apply_overrides, runner_active, start_run, start_runner
    runs = tmp_path / "runs"
    sets = [f"model.path={tiny_model_dir}", f"dataset.path={image_dir}", f"saving.runs_dir={runs}", *BASE]
    outside = start_run(apply_overrides(TrainConfig(), [*sets, "schedule.max_steps=40", "run.name=outside"]))
    job = add(capsys, *add_args(tiny_model_dir, image_dir, runs, "schedule.max_steps=2", "run.name=queued"))
    monkeypatch.chdir(tmp_path)  # not the repository: the runner must still find this trainer package
    runner = start_runner(runs)
    try:
        assert wait_for(lambda: runner_active(runs), timeout=60)
        assert outside.process.wait(timeout=600) == 0
        assert runner.wait(timeout=600) == 0
    finally:
        if runner.poll() is None:
            runner.kill()
    queued = jobs_by_id(runs)[job]
    ended = {e.time for e in read_events(outside.run_dir / "events.jsonl") if isinstance(e, Finished)}
    began = {e.time for e in read_events(Path(queued.run_dir) / "events.jsonl") if isinstance(e, Started)}
    assert queued.state == "done" and min(began) >= max(ended)  # it waited for the outside run to end
    log = (runs / "queue-runner.log").read_text(encoding="utf-8")
    assert "outside" in log and "training" in log, log


def test_a_look_at_whether_a_runner_runs_never_keeps_one_from_starting(tmp_path):
    """runner_active takes the runner's lock for an instant to look (the app's Queue tab every few seconds); a
    runner starting in that instant waits it out instead of refusing as if another runner held the queue."""
    from trainer import runner_active
    looking = threading.Event()

    def look():
        while not looking.is_set():
            runner_active(tmp_path)
    watcher = threading.Thread(target=look)
    watcher.start()
    try:
        for _ in range(100):
            with runner_lock(tmp_path, None):
                pass
    finally:
        looking.set()
        watcher.join()
