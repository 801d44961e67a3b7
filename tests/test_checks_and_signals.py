"""Issue 23, items 12-14 and 16-18: one check for validate, the Train tab's Check and train (numbers too big for
torch, base models that cannot load, runs folders that cannot be written); a full disk named by its file; a
checkpoint without its manifest; Ctrl+C at every moment of start-up; a run folder killed while it was created."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import save_file

from app.settings import AppSettings
from app.tabs import train as tab
from trainer import TrainConfig, runs
from trainer.__main__ import main
from trainer.events import Failed, Message, read_events
from trainer.job import child_env

ROOT = Path(__file__).resolve().parent.parent


def cli_sets(model_dir, data_dir, runs_dir, *extra) -> list[str]:
    out = []
    for item in [f"model.path={model_dir}", f"dataset.path={data_dir}", f"saving.runs_dir={runs_dir}",
                 "dataset.resolution=32", "dataset.batch_size=2", "network.rank=4", "schedule.max_steps=3",
                 "run.name=c", "saving.dtype=fp32", "sampling.every_n_steps=0", "schedule.warmup_steps=0",
                 *extra]:
        out += ["--set", item]
    return out


def no_traceback(err: str) -> bool:
    return "Traceback" not in err and "File \"" not in err


def problem_lines(err: str) -> list[str]:
    """The lines of a CLI error that say something (a ConfigError opens with 'error: config problems in ...:')."""
    return [line for line in err.splitlines() if line.strip() and not line.startswith("error: config problems")]


def check_form(tmp_path: Path, runs_dir: Path | None = None, **values) -> tuple[dict, str]:
    """The Train tab's Check button on a form with these config values."""
    cfg = TrainConfig()
    for key, value in values.items():
        setattr(getattr(cfg, key.split("__")[0]), key.split("__")[1], value)
    settings = AppSettings(data_dir=tmp_path / "datasets", runs_dir=runs_dir or tmp_path / "runs",
                           import_dirs=(tmp_path,))
    return tab.check_form(settings, tab.form_values(cfg))


# 12: numbers too big for torch ------------------------------------------------------------------------------------

@pytest.mark.parametrize("key, value", [("run.seed", "99999999999999999999999"), ("run.seed", str(2 ** 64)),
                                        ("schedule.max_steps", "99999999999999999999999")])
def test_a_seed_or_step_count_too_big_is_refused_by_validate_check_and_train(image_dir, tmp_path, capsys, key,
                                                                            value):
    sets = cli_sets("", image_dir, tmp_path / "runs", f"{key}={value}")
    assert main(["validate", "--config", "tiny-demo", *sets]) == 2
    err = capsys.readouterr().err
    assert problem_lines(err) == [f"  - {key} is {value}; it must be at most {problem_max(key)}"], err
    assert main(["train", *sets]) == 2
    err = capsys.readouterr().err
    assert key in err and no_traceback(err), err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    section, name = key.split(".")
    errors, summary = check_form(tmp_path, dataset__path=str(image_dir), **{f"{section}__{name}": int(value)})
    assert key in errors and summary != "Ready to start.", (errors, summary)


def problem_max(key: str) -> int:
    from trainer import field_info
    return field_info(key).max


def test_the_largest_seed_allowed_trains(tiny_model_dir, image_dir, tmp_path, capsys):
    from trainer import field_info
    top = field_info("run.seed").max
    code = main(["train", "--quiet", *cli_sets(tiny_model_dir, image_dir, tmp_path / "runs", f"run.seed={top}",
                                               "schedule.max_steps=1")])
    err = capsys.readouterr().err
    assert code == 0 and no_traceback(err), err


# 13: one check for validate, Check and train ----------------------------------------------------------------------

def bad_models(tmp_path: Path) -> dict[str, Path]:
    out = {}
    out["empty folder"] = tmp_path / "empty"
    out["empty folder"].mkdir()
    out["broken model_index.json"] = tmp_path / "broken"
    out["broken model_index.json"].mkdir()
    (out["broken model_index.json"] / "model_index.json").write_text('{"_class_name": "StableDiff')
    out["a text file"] = tmp_path / "notes.txt"
    out["a text file"].write_text("not a model")
    out["random bytes"] = tmp_path / "random.safetensors"
    out["random bytes"].write_bytes(os.urandom(4096))
    out["a LoRA"] = tmp_path / "style-lora.safetensors"
    import torch
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4)},
              str(out["a LoRA"]))
    out["no unet"] = tmp_path / "no-unet"
    out["no unet"].mkdir()
    (out["no unet"] / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    out["missing component"] = tmp_path / "half-copied"
    out["missing component"].mkdir()
    (out["missing component"] / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
         "vae": ["diffusers", "AutoencoderKL"]}))
    out["an SDXL refiner"] = tmp_path / "refiner"
    (out["an SDXL refiner"] / "unet").mkdir(parents=True)
    (out["an SDXL refiner"] / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionXLImg2ImgPipeline", "text_encoder": [None, None],
         "unet": ["diffusers", "UNet2DConditionModel"]}))
    out["/etc/passwd"] = Path("/etc/passwd")
    return out


FIXES = {"empty folder": "model_index.json", "broken model_index.json": "JSON", "a text file": ".safetensors",
         "random bytes": "corrupt", "a LoRA": "LoRA adapter, not a base model", "no unet": "UNet",
         "missing component": "unet", "an SDXL refiner": "SDXL refiner", "/etc/passwd": ".safetensors"}


@pytest.mark.parametrize("kind", list(FIXES))
def test_a_base_model_that_cannot_load_is_refused_by_validate_check_and_train(image_dir, tmp_path, capsys, kind):
    model = bad_models(tmp_path)[kind]
    sets = cli_sets(model, image_dir, tmp_path / "runs")
    assert main(["validate", "--config", "tiny-demo", *sets]) == 2
    err = capsys.readouterr().err
    lines = problem_lines(err)
    assert len(lines) == 1 and str(model) in lines[0] and FIXES[kind] in lines[0] and no_traceback(err), err
    assert "StableDiffusionPipeline model, not a Stable Diffusion pipeline" not in err
    assert main(["train", *sets]) == 2
    assert str(model) in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # refused before a run folder
    errors, summary = check_form(tmp_path, dataset__path=str(image_dir), model__path=str(model))
    assert str(model) in errors.get("model.path", "") and summary != "Ready to start.", (errors, summary)


def test_a_good_base_model_still_passes(tiny_model_dir, tiny_sdxl_dir, image_dir, tmp_path, capsys):
    for model in ("", tiny_model_dir, tiny_sdxl_dir, "someone/a-hub-model"):  # a hub id is checked when it loads
        assert main(["validate", "--config", "tiny-demo", *cli_sets(model, image_dir, tmp_path / "runs")]) == 0, \
            capsys.readouterr().err
        errors, summary = check_form(tmp_path, dataset__path=str(image_dir), model__path=str(model))
        assert summary == "Ready to start.", errors


def test_a_runs_folder_that_is_a_file_is_refused_by_validate_check_and_train(image_dir, tmp_path, capsys):
    afile = tmp_path / "runs-file"
    afile.write_text("x")
    for runs_dir in (afile, afile / "runs"):
        sets = cli_sets("", image_dir, runs_dir)
        assert main(["validate", "--config", "tiny-demo", *sets]) == 2
        err = capsys.readouterr().err
        lines = problem_lines(err)
        assert len(lines) == 1 and "saving.runs_dir" in lines[0] and str(afile) in lines[0], err
        assert main(["train", *sets]) == 2
        err = capsys.readouterr().err
        assert "saving.runs_dir" in err and "[Errno" not in err and no_traceback(err), err
        errors, summary = check_form(tmp_path, runs_dir=runs_dir, dataset__path=str(image_dir))
        assert "--runs-dir" in summary and str(tmp_path) not in summary, (errors, summary)  # no server path shown


def test_a_read_only_runs_folder_is_refused_by_validate_check_and_train(image_dir, tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access

    def read_only(path, mode, *args, **kwargs):  # root ignores chmod: the answer of a read-only file system
        if mode & os.W_OK and Path(path).resolve().is_relative_to(ro):
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", read_only)
    for runs_dir in (ro, ro / "runs"):
        sets = cli_sets("", image_dir, runs_dir)
        assert main(["validate", "--config", "tiny-demo", *sets]) == 2
        err = capsys.readouterr().err
        lines = problem_lines(err)
        assert len(lines) == 1 and "saving.runs_dir" in lines[0] and str(ro) in lines[0], err
        assert main(["train", *sets]) == 2
        assert "saving.runs_dir" in capsys.readouterr().err
        errors, summary = check_form(tmp_path, runs_dir=runs_dir, dataset__path=str(image_dir))
        assert "--runs-dir" in summary and str(tmp_path) not in summary, (errors, summary)  # no server path shown


def test_an_os_error_the_check_could_not_foresee_is_a_message_with_the_fix(image_dir, tmp_path, capsys,
                                                                           monkeypatch):
    ro = tmp_path / "ro"
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):  # the folder turns read-only between the check and the run
        if Path(self).is_relative_to(ro):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    assert main(["train", *cli_sets("", image_dir, ro)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "[Errno" not in err and str(ro) in err, err
    assert "read-only" in err.lower() and "saving.runs_dir" in err and no_traceback(err), err


# 14: a full disk names its file and the checkpoint that is kept ---------------------------------------------------

def disk_full_after(monkeypatch, writes: int) -> None:
    """safetensors as it fails on a full disk (its own error type, the OS's words inside), after `writes` files."""
    import safetensors.torch
    from safetensors import SafetensorError
    import trainer.checkpoint as ck
    real, calls = safetensors.torch.save_file, {"n": 0}

    def full_disk(tensors, filename, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > writes:
            raise SafetensorError(f"Error while serializing: I/O error: No space left on device (os error 28) at "
                                  f"path \"{Path(filename).parent / '.tmpXy12Ab'}\"")
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    monkeypatch.setattr(ck, "save_file", full_disk)


@pytest.mark.parametrize("moment", ["run start", "first checkpoint", "second checkpoint"])
def test_a_full_disk_names_the_file_and_the_last_checkpoint(tiny_model_dir, image_dir, tmp_path, capsys,
                                                             monkeypatch, moment):
    extra = ["schedule.max_steps=6", "saving.every_n_steps=2"]
    if moment == "run start":  # the disk latent cache writes its first entry before the first step
        extra += ["dataset.cache_latents=disk", f"dataset.cache_dir={tmp_path / 'cache'}"]
    # each checkpoint writes lora, optimizer and adapter.safetensors: the 4th write is the second checkpoint's
    disk_full_after(monkeypatch, {"run start": 0, "first checkpoint": 0, "second checkpoint": 3}[moment])
    code = main(["train", *cli_sets(tiny_model_dir, image_dir, tmp_path / "runs", *extra)])
    err = capsys.readouterr().err
    assert code == 1 and no_traceback(err), err
    assert "No space left on device" in err and "SafetensorError" not in err and ".tmp" not in err, err
    written = "cache" if moment == "run start" else "checkpoints"
    assert f"{written}/" in err and ".safetensors" in err, err
    run_dir, = (tmp_path / "runs").iterdir()
    failed = [e for e in read_events(run_dir / "events.jsonl") if isinstance(e, Failed)][-1]
    assert "space" in failed.advice.lower() and ".safetensors" in failed.error
    kept = runs.checkpoint_dirs(run_dir)
    if moment == "second checkpoint":
        assert [p.name for p in kept] == ["step-000002"] and failed.last_checkpoint == str(kept[0])
        assert "step-000002" in err
    else:
        assert kept == [] and failed.last_checkpoint == "" and "no checkpoint was written yet" in err


# 16: a checkpoint without its manifest ----------------------------------------------------------------------------

def test_resuming_from_a_checkpoint_whose_manifest_was_deleted_says_so(tiny_model_dir, image_dir, tmp_path, capsys):
    sets = cli_sets(tiny_model_dir, image_dir, tmp_path / "runs", "schedule.max_steps=2", "saving.every_n_steps=1")
    assert main(["train", "--quiet", *sets]) == 0
    run_dir, = (tmp_path / "runs").iterdir()
    newest = runs.checkpoint_dirs(run_dir)[-1]
    (newest / runs.MANIFEST).unlink()
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir), "--set", "schedule.max_steps=3"]) == 0
    out = capsys.readouterr()
    warnings = [e.text for e in read_events(run_dir / "events.jsonl") if isinstance(e, Message)]
    said = [w for w in warnings if newest.name in w and "manifest.json" in w]
    assert said, warnings
    assert said[0] in out.out + out.err


# 17: Ctrl+C at every moment of start-up ---------------------------------------------------------------------------

def default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a background job of a non-interactive shell ignores SIGINT


# Test-only probe, from outside the product code: site imports sitecustomize from PYTHONPATH; an audit hook marks the
# moment runpy starts executing trainer/__main__.py. Before it, the interpreter is still starting (before Python
# sets its SIGINT handler, SIGINT ends the process as the shell's Ctrl+C does; a few ms later CPython's own start-up
# prints "Fatal Python error" for it): no loradesk code runs yet, so the moments are counted from the mark.
MARK = """
import os, sys
mark = os.environ.get("LORADESK_TEST_MAIN_MARK")
def seen(event, args):
    if event == "exec" and getattr(args[0], "co_filename", "").endswith(os.path.join("trainer", "__main__.py")):
        open(mark, "w").close()
if mark:
    sys.addaudithook(seen)
"""


def start_cli(argv: list[str], tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    hook, mark = tmp_path / "hook", tmp_path / "main-started"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(MARK)
    env = child_env({**os.environ, "LORADESK_TEST_MAIN_MARK": str(mark),
                     "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))})
    process = subprocess.Popen([sys.executable, "-m", "trainer", *argv], env=env, cwd=str(ROOT),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_sigint)
    return process, mark


@pytest.mark.parametrize("delay", [None, 0.0, 0.01, 0.05, 0.2, 0.5, 1.0, 1.5, 2.5])
def test_ctrl_c_during_start_up_is_one_line_and_exit_130(tiny_model_dir, image_dir, tmp_path, delay):
    """delay: seconds after trainer/__main__.py starts (None: right after the process is spawned)."""
    runs_dir = tmp_path / "runs"
    process, mark = start_cli(["train", "--quiet", *cli_sets(tiny_model_dir, image_dir, runs_dir,
                                                             "schedule.max_steps=100000")], tmp_path)
    try:
        while delay is not None and not mark.exists() and process.poll() is None:
            time.sleep(0.001)
        time.sleep(delay or 0.0)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=300)
    finally:
        process.kill()
    err = err.decode()
    assert no_traceback(err), err
    trained = [p for p in runs_dir.iterdir() if (p / "events.jsonl").exists()] if runs_dir.exists() else []
    if process.returncode == 0:  # a fast machine: the first Ctrl+C came during training and stopped after a step
        assert "stopping after this step" in err and trained, err
        return
    # 130; or, before Python set its handler, ended by SIGINT itself (a shell shows both as 130)
    assert process.returncode == 130 or (delay is None and process.returncode == -signal.SIGINT), \
        (process.returncode, err)
    assert len([line for line in err.splitlines() if line.strip()]) <= 1, err
    assert not runs_dir.exists() or list(runs_dir.iterdir()) == [], list(runs_dir.iterdir())  # nothing written


# 18: a run folder killed while it was created ---------------------------------------------------------------------

def half_created_run(runs_dir: Path, name: str = "c-20261206-101500") -> Path:
    """What a SIGKILL inside create_run_dir leaves: the folder, and the config's temporary file."""
    run_dir = runs_dir / name
    run_dir.mkdir(parents=True)
    (run_dir / ".config.toml.k2j4x_9a.tmp").write_text("schema_version = 2\n[run]\nna")
    return run_dir


def test_resuming_a_run_folder_killed_while_it_was_created_says_it_never_started(tmp_path, capsys):
    run_dir = half_created_run(tmp_path / "runs")
    assert main(["train", "--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "never started" in err and "python -m trainer train" in err and "not a loradesk run folder" not in err
    assert len(err.strip().splitlines()) == 1 and no_traceback(err), err
    assert not run_dir.exists()  # held nothing but our temporary file


def test_the_run_list_ignores_and_cleans_folders_killed_while_they_were_created(tmp_path):
    run_dir = half_created_run(tmp_path / "runs")
    old = time.time() - 3600
    os.utime(run_dir / ".config.toml.k2j4x_9a.tmp", (old, old))
    os.utime(run_dir, (old, old))
    fresh = half_created_run(tmp_path / "runs", "c-20261206-101501")  # maybe being created right now: left alone
    assert runs.list_runs(tmp_path / "runs") == []
    assert not run_dir.exists() and fresh.exists()


def test_a_kill_while_a_run_folder_is_created_leaves_nothing(tmp_path, monkeypatch):
    import trainer.runs as R
    real = R.write_text_atomic

    def interrupted(path, text):
        raise KeyboardInterrupt

    monkeypatch.setattr(R, "write_text_atomic", interrupted)
    cfg = TrainConfig()
    cfg.saving.runs_dir = str(tmp_path / "runs")
    with pytest.raises(KeyboardInterrupt):
        runs.create_run_dir(cfg)
    monkeypatch.setattr(R, "write_text_atomic", real)
    assert list((tmp_path / "runs").iterdir()) == []
