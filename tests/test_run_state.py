"""Issue 15, state that must stay true: liveness from a lock, commands that are never lost, checkpoints that verify,
leftovers of killed runs cleaned, run folders claimed atomically. Each as a user hits it: the CLI, the app's
handlers, the public API."""
from __future__ import annotations

import os
import threading

import pytest

from test_training import make_cfg, train
from trainer import config as C
from trainer import runs
from trainer.__main__ import main
from trainer.events import EventLog, Finished, Message, Progress, Started, read_events, send_command
from trainer.job import active_run, check_resumable, start_run
from trainer.runlock import holding


@pytest.fixture
def stopped_run(tiny_model_dir, image_dir, tmp_path):
    """A run stopped at step 4 with checkpoints at steps 2 and 4 (it would train to 8)."""
    cfg = make_cfg(tiny_model_dir, image_dir, tmp_path, **{"schedule.max_steps": 8, "saving.every_n_steps": 2})

    def stop_at_4(trainer, event):
        if isinstance(event, Progress) and event.step == 4:
            trainer.inbox.request("stop")

    _, _, run_dir = train(cfg, on_event=stop_at_4)
    assert [p.name for p in runs.checkpoint_dirs(run_dir)] == ["step-000002", "step-000004"]
    return run_dir


def resume_cli(run_dir, capsys) -> tuple[int, list, str]:
    code = main(["train", "--resume", str(run_dir), "--quiet"])
    return code, read_events(run_dir / "events.jsonl"), capsys.readouterr().err


def last_attempt(events):
    starts = [i for i, e in enumerate(events) if isinstance(e, Started)]
    return events[starts[-1]:]


# 6 + 7: liveness ------------------------------------------------------------------------------------------------

def test_a_torn_last_line_does_not_hide_the_resumed_run(stopped_run):
    with open(stopped_run / "events.jsonl", "ab") as f:
        f.write(b'{"type": "progress", "step": 5, "lo')  # a full disk mid-write
    with holding(stopped_run):  # the resumed trainer
        EventLog(stopped_run / "events.jsonl")(Started(run_dir=str(stopped_run), total_steps=8, start_step=4,
                                                       num_images=4, pid=os.getpid()))
        info = runs.run_info(stopped_run)
        assert info.state == "running" and info.step == 4
        assert active_run(stopped_run.parent).run_dir == stopped_run
        with pytest.raises(Exception, match="still training"):
            start_run(C.load(stopped_run / "config.toml"))
    assert runs.run_info(stopped_run).state == "failed"  # the lock is gone: it was killed, not running


def test_a_dead_runs_reused_pid_does_not_block_new_training(stopped_run):
    """Its Started event names a PID that is alive (this very test process), but no trainer holds the lock."""
    EventLog(stopped_run / "events.jsonl")(Started(run_dir=str(stopped_run), total_steps=8, start_step=4,
                                                   num_images=4, pid=os.getpid()))
    info = runs.run_info(stopped_run)
    assert info.state == "failed" and "killed or crashed" in info.error
    assert active_run(stopped_run.parent) is None


# 8: commands ------------------------------------------------------------------------------------------------------

def test_a_stop_sent_before_the_trainer_reads_commands_still_counts(tiny_model_dir, image_dir, tmp_path):
    cfg = make_cfg(tiny_model_dir, image_dir, tmp_path, **{"schedule.max_steps": 40})
    run_dir = runs.create_run_dir(cfg)
    send_command(run_dir, "stop")  # while the child would still be loading the model
    _, events, _ = train(cfg, run_dir=run_dir)
    finished = [e for e in events if isinstance(e, Finished)][0]
    assert finished.stopped and finished.step <= 1


def test_an_earlier_attempts_stop_does_not_stop_the_resume(stopped_run, capsys):
    send_command(stopped_run, "stop")  # sent to the attempt that already stopped
    code, events, err = resume_cli(stopped_run, capsys)
    assert code == 0, err
    assert [e.step for e in last_attempt(events) if isinstance(e, Progress)] == [5, 6, 7, 8]


# 9 + 10 + 11: checkpoints ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated lora", "empty state"])
def test_resume_skips_a_damaged_newest_checkpoint_and_says_which(stopped_run, capsys, damage):
    newest = stopped_run / "checkpoints" / "step-000004"
    if damage == "truncated lora":
        data = (newest / "lora.safetensors").read_bytes()
        (newest / "lora.safetensors").write_bytes(data[: len(data) // 2])
    else:
        (newest / "state.json").write_text("")
    code, events, err = resume_cli(stopped_run, capsys)
    assert code == 0, err
    attempt = last_attempt(events)
    assert attempt[0].start_step == 2
    assert [e.step for e in attempt if isinstance(e, Progress)] == [3, 4, 5, 6, 7, 8]
    notes = [e.text for e in events if isinstance(e, Message)]
    assert any("skipped checkpoint step-000004" in n and "damaged" in n for n in notes), notes
    assert "does not fit" not in err


def test_every_checkpoint_damaged_is_one_clear_message(stopped_run, capsys):
    for folder in runs.checkpoint_dirs(stopped_run):
        (folder / "optimizer.safetensors").write_bytes(b"")
    assert main(["train", "--resume", str(stopped_run)]) == 2
    err = capsys.readouterr().err
    assert "every checkpoint" in err and "step-000004" in err and "Traceback" not in err


def test_a_folder_with_an_unknown_name_in_checkpoints_is_ignored(stopped_run, capsys, tmp_path):
    import shutil
    from app.main import build_app
    from app.settings import AppSettings
    shutil.copytree(stopped_run / "checkpoints" / "step-000004", stopped_run / "checkpoints" / "step-000055 copy")
    assert [p.name for p in runs.checkpoint_dirs(stopped_run)] == ["step-000002", "step-000004"]
    build_app(AppSettings(data_dir=tmp_path / "d", runs_dir=stopped_run.parent, adapters_dir=tmp_path / "a"))
    code, events, err = resume_cli(stopped_run, capsys)
    assert code == 0 and last_attempt(events)[0].start_step == 4, err


def test_leftovers_of_killed_runs_are_cleaned_and_a_half_swapped_checkpoint_is_kept(stopped_run, capsys):
    checkpoints = stopped_run / "checkpoints"
    (stopped_run / ".t.safetensors.x1.tmp").write_bytes(b"\0" * 1000)
    (checkpoints / ".step-000006.x2.tmp").mkdir()
    (checkpoints / ".step-000006.x2.tmp" / "lora.safetensors").write_bytes(b"\0" * 1000)
    os.replace(checkpoints / "step-000004", checkpoints / ".step-000004.old")  # killed between the two renames
    code, events, err = resume_cli(stopped_run, capsys)
    assert code == 0, err
    assert last_attempt(events)[0].start_step == 4, "the only complete copy of step 4 was put back and used"
    leftovers = [p.name for p in stopped_run.rglob(".*") if p.name.endswith((".tmp", ".old"))]
    assert leftovers == []


def test_checkpoints_carry_a_manifest_that_verifies(stopped_run):
    for folder in runs.checkpoint_dirs(stopped_run):
        assert (folder / runs.MANIFEST).is_file() and runs.checkpoint_problem(folder) == ""


# 12: run folders --------------------------------------------------------------------------------------------------

def test_runs_created_in_the_same_second_each_get_a_folder(tmp_path):
    cfg = C.TrainConfig()
    cfg.saving.runs_dir = str(tmp_path / "runs")
    made, errors = [], []

    def create():
        try:
            made.append(runs.create_run_dir(cfg))
        except Exception as e:  # noqa: BLE001 - the race is what we look for
            errors.append(e)

    threads = [threading.Thread(target=create) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(made)) == 24


# 20: messages -----------------------------------------------------------------------------------------------------

def test_resuming_a_run_killed_before_its_first_checkpoint_says_so(tiny_model_dir, image_dir, tmp_path, capsys):
    cfg = make_cfg(tiny_model_dir, image_dir, tmp_path, **{"saving.every_n_steps": 50})
    run_dir = runs.create_run_dir(cfg)
    assert main(["train", "--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "before its first checkpoint" in err and "set saving.every_n_steps" not in err


def test_a_folder_given_as_config_is_named_as_a_folder(tmp_path, capsys):
    assert main(["validate", "--config", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is a folder" in err and "does not exist" not in err


# 18: Ctrl+C while the model loads ---------------------------------------------------------------------------------

def test_ctrl_c_while_loading_stops_at_once_and_writes_nothing(tiny_model_dir, image_dir, tmp_path, capsys,
                                                               monkeypatch):
    import signal
    import time
    import trainer.models as models
    real_load, finished_loading = models.load_base_model, []

    def slow_load(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl+C while the weights load
        time.sleep(30)                        # (on main the run waited for the load, then wrote a step-0 adapter)
        finished_loading.append(True)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(models, "load_base_model", slow_load)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = main(["train", "--quiet", *[x for item in (f"model.path={tiny_model_dir}", f"dataset.path={image_dir}",
                                                          f"saving.runs_dir={tmp_path / 'runs'}", "run.name=c")
                                           for x in ("--set", item)]])
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    assert code == 130 and not finished_loading
    assert "nothing was written" in capsys.readouterr().err
    assert not list((tmp_path / "runs").glob("*/*.safetensors")) and not list((tmp_path / "runs").glob("*/checkpoints"))


def test_a_stop_before_the_first_step_writes_no_adapter(tiny_model_dir, image_dir, tmp_path):
    cfg = make_cfg(tiny_model_dir, image_dir, tmp_path, **{"schedule.max_steps": 40})
    run_dir = runs.create_run_dir(cfg)
    send_command(run_dir, "stop")
    path, events, _ = train(cfg, run_dir=run_dir)
    assert path is None and not runs.final_adapter_path(run_dir, cfg).exists() and not runs.checkpoint_dirs(run_dir)
    info = runs.run_info(run_dir)
    assert info.state == "stopped" and info.adapter_path is None


def test_a_resumed_run_still_loading_reads_as_running(stopped_run):
    """Review finding: while a resumed trainer loaded (lock held, no Started yet) the run read as stopped, so a
    second training could start and a second resume could drop the first one's commands."""
    assert runs.run_info(stopped_run).state == "stopped"
    with holding(stopped_run):
        assert runs.run_info(stopped_run).state == "running"
        assert active_run(stopped_run.parent).run_dir == stopped_run
        with pytest.raises(Exception, match="still running"):
            check_resumable(stopped_run)
    assert runs.run_info(stopped_run).state == "stopped"


def test_a_damaged_newer_checkpoint_is_set_aside_so_pruning_keeps_the_good_one(stopped_run, capsys):
    newest = stopped_run / "checkpoints" / "step-000004"
    (newest / "optimizer.safetensors").write_bytes(b"")
    code, events, err = resume_cli(stopped_run, capsys)
    assert code == 0, err
    names = sorted(p.name for p in (stopped_run / "checkpoints").iterdir())
    assert "step-000004.damaged" in names and "step-000008" in names
    assert runs.last_checkpoint(stopped_run).name == "step-000008"
    assert all(runs.checkpoint_problem(p) == "" for p in runs.checkpoint_dirs(stopped_run))


def test_on_windows_a_pid_is_probed_without_os_kill(monkeypatch):
    """os.kill(pid, 0) on Windows sends the process a Ctrl+C (signal 0 is CTRL_C_EVENT there), which would stop
    the very run the app asked about; the fallback asks the OS for the process's exit code instead."""
    import ctypes
    from types import SimpleNamespace
    from trainer import runlock
    calls = []

    def open_process(access, inherit, pid):
        calls.append(("open", pid))
        return 7 if pid == 1234 else 0

    def exit_code(handle, code):
        code._obj.value = 259  # STILL_ACTIVE
        return 1

    last_error = {99: 87, 4321: 5}  # ERROR_INVALID_PARAMETER: no such process; ERROR_ACCESS_DENIED: another user's
    kernel32 = SimpleNamespace(OpenProcess=open_process, GetExitCodeProcess=exit_code,
                               CloseHandle=lambda handle: calls.append(("close", handle.value)),
                               GetLastError=lambda: last_error[calls[-1][1]])
    monkeypatch.setattr(runlock.os, "name", "nt")
    monkeypatch.setattr(ctypes, "windll", SimpleNamespace(kernel32=kernel32), raising=False)
    monkeypatch.setattr(runlock.os, "kill", lambda *a: pytest.fail("os.kill must not be called on Windows"))
    assert runlock.pid_alive(1234) is True and ("close", 7) in calls
    assert runlock.pid_alive(99) is False and runlock.pid_alive(4321) is True
