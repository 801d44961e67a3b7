"""The CLI contract (exit codes, messages on stderr, run folder layout) and training in a child process."""
import time

import torch
from pathlib import Path

import pytest

from trainer import config as C
from trainer.__main__ import main, resolve_config
from trainer.formats import load_adapter
from trainer import JobError, active_run, resume_run, start_run

BASE_SETS = ["dataset.resolution=32", "dataset.batch_size=2", "network.rank=4", "schedule.max_steps=3",
             "run.name=cli", "saving.dtype=fp32"]


def sets(model_dir, data_dir, runs_dir, *extra):
    out = []
    for item in [f"model.path={model_dir}", f"dataset.path={data_dir}", f"saving.runs_dir={runs_dir}",
                 *BASE_SETS, *extra]:
        out += ["--set", item]
    return out


def test_presets_lists_the_shipped_presets(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in ("tiny-demo", "sd15-character", "sd15-style", "sd15-low-vram"):
        assert name in out


def test_a_shipped_preset_finds_its_example_folders_from_any_directory(tmp_path, monkeypatch, capsys):
    root = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(tmp_path)
    assert main(["validate", "--config", str(root / "presets" / "tiny-demo.toml")]) == 0, capsys.readouterr().err
    cfg = resolve_config("tiny-demo", ["dataset.trigger=other"])
    assert Path(cfg.dataset.path) == root / "examples" / "demo-concept"
    assert Path(cfg.dataset.regularization_path) == root / "examples" / "demo-regularization"
    assert cfg.dataset.trigger == "other"
    own = tmp_path / "mine.toml"  # the user's own config keeps the working directory's meaning
    own.write_text('[dataset]\npath = "examples/demo-concept"\n')
    assert resolve_config(str(own), []).dataset.path == "examples/demo-concept"


def test_config_errors_exit_2_with_the_message_on_stderr(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[network]\nrnak = 4\n")
    assert main(["validate", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "network.rnak" in err and "bad.toml" in err
    assert main(["train", "--config", str(bad)]) == 2
    assert main(["train", "--set", "network.rank=0"]) == 2
    assert "network.rank" in capsys.readouterr().err


def test_no_valid_image_stops_before_any_model_is_loaded(tmp_path, capsys, monkeypatch):
    import trainer.models
    monkeypatch.setattr(trainer.models, "load_base_model", lambda *a, **k: pytest.fail("model was loaded"))
    data = tmp_path / "data"
    data.mkdir()
    (data / "broken.png").write_bytes(b"not an image")
    code = main(["train", *sets("", data, tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and str(data) in err and "broken.png" in err
    assert list((tmp_path / "runs").iterdir()) == [], "a run that never started leaves no folder"


def test_train_then_export(tiny_model_dir, image_dir, tmp_path, capsys):
    runs_dir = tmp_path / "runs"
    assert main(["train", "--quiet", *sets(tiny_model_dir, image_dir, runs_dir)]) == 0
    run_dir, = runs_dir.iterdir()
    assert run_dir.name.startswith("cli-")
    adapter = run_dir / "cli.safetensors"
    assert adapter.exists() and f"adapter: {adapter}" in capsys.readouterr().out
    out = tmp_path / "out.safetensors"
    assert main(["export", str(run_dir), "--format", "diffusers", "--dtype", "fp32", "--out", str(out)]) == 0
    a, b = load_adapter(adapter), load_adapter(out)
    assert a.layers.keys() == b.layers.keys()
    for k in a.layers:
        assert (a.layers[k].delta() - b.layers[k].delta()).abs().max() < 1e-6


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    from trainer import create_run_dir
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert main(["train", "--resume", str(run_dir)]) == 2
    assert "not a loradesk run folder" in capsys.readouterr().err
    cfg = C.TrainConfig()
    cfg.saving.runs_dir = str(tmp_path / "runs")
    assert main(["train", "--resume", str(create_run_dir(cfg))]) == 2
    assert "no checkpoint to resume from; set saving.every_n_steps" in capsys.readouterr().err


def wait_for(predicate, timeout=120.0):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_job_runs_in_a_child_process_stops_and_resumes(tiny_model_dir, image_dir, tmp_path):
    cfg = C.apply_overrides(C.TrainConfig(), sets(tiny_model_dir, image_dir, tmp_path / "runs")[1::2])
    C.set_value(cfg, "schedule.max_steps", 400)
    job = start_run(cfg)
    assert job.process.pid != 0
    assert wait_for(lambda: job.info().step >= 1), (job.run_dir / "train.log").read_text()
    assert active_run(tmp_path / "runs").run_dir == job.run_dir
    with pytest.raises(JobError, match="still training"):
        start_run(cfg)
    job.stop()
    assert job.wait(60) == 0
    info = job.info()
    assert info.state == "stopped" and info.step < 400 and info.adapter_path.exists()
    assert active_run(tmp_path / "runs") is None
    C.set_value(cfg, "schedule.max_steps", info.step + 2)
    from trainer import write_text_atomic
    write_text_atomic(job.run_dir / "config.toml", C.dumps(cfg))  # train two more steps on resume
    resumed = resume_run(job.run_dir)
    assert resumed.wait(60) == 0, (job.run_dir / "train.log").read_text()
    assert resumed.info().state == "finished" and resumed.info().step == info.step + 2
    assert Path(resumed.info().adapter_path).exists()


def test_a_child_that_fails_before_training_reports_why(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.png").write_bytes(b"")
    cfg = C.apply_overrides(C.TrainConfig(), [f"dataset.path={data}", f"saving.runs_dir={tmp_path / 'runs'}"])
    job = start_run(cfg)
    assert job.wait(60) == 2
    info = job.info()
    assert info.state == "failed" and "a.png" in info.error


def test_resume_a_finished_run_to_train_longer(tiny_model_dir, image_dir, tmp_path, capsys):
    from safetensors.torch import load_file
    runs_a, runs_b = tmp_path / "a", tmp_path / "b"
    assert main(["train", "--quiet", *sets(tiny_model_dir, image_dir, runs_b, "schedule.max_steps=5",
                                           "schedule.lr_scheduler=constant")]) == 0
    assert main(["train", "--quiet", *sets(tiny_model_dir, image_dir, runs_a, "schedule.lr_scheduler=constant")]) == 0
    run_dir, = runs_a.iterdir()
    assert main(["train", "--quiet", "--resume", str(run_dir), "--set", "schedule.max_steps=5"]) == 0
    from trainer.events import Started, read_events
    assert [e.start_step for e in read_events(run_dir / "events.jsonl") if isinstance(e, Started)] == [0, 3]
    longer, = runs_b.iterdir()
    a, b = load_file(str(run_dir / "cli.safetensors")), load_file(str(longer / "cli.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a), "3 steps + 2 resumed steps equal 5 uninterrupted steps"


def test_resume_refuses_settings_the_checkpoint_depends_on(tiny_model_dir, image_dir, tmp_path, capsys):
    assert main(["train", "--quiet", *sets(tiny_model_dir, image_dir, tmp_path / "runs")]) == 0
    run_dir, = (tmp_path / "runs").iterdir()
    before = (run_dir / "config.toml").read_text()
    assert main(["train", "--resume", str(run_dir), "--set", "network.rank=8"]) == 2
    assert "network.rank cannot change" in capsys.readouterr().err
    assert (run_dir / "config.toml").read_text() == before, "a refused resume changes nothing"
    assert main(["train", "--resume", "--set", "schedule.max_steps=9"]) == 2
    assert "--resume needs the run folder" in capsys.readouterr().err


def test_export_and_validate_report_bad_input_as_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    assert main(["export", str(bad), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "bad.safetensors" in capsys.readouterr().err
    cfg = tmp_path / "fp16.toml"
    cfg.write_text(f"[dataset]\npath = '{tmp_path}'\n[precision]\nmixed = 'fp16'\n[optimizer]\nname = 'adamw8bit'\n")
    if not torch.cuda.is_available():
        assert main(["validate", "--config", str(cfg)]) == 2
        err = capsys.readouterr().err
        assert "precision.mixed=fp16 needs a CUDA GPU" in err and "adamw8bit" in err
