"""Issue 15, failures that must become messages: each ends in one line naming the cause (exit 2 for config and
data errors, 1 for a failed run), a Failed event where a run existed, and nothing the user made lost."""
from __future__ import annotations

import errno
import io
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from test_training import make_cfg, train
from trainer import runs
from trainer.__main__ import main
from trainer.events import Failed, Message, read_events
from trainer.formats import save_adapter
from trainer.lora_state import Adapter, LoraLayer



def cli_sets(model_dir, data_dir, runs_dir, *extra) -> list[str]:
    out = []
    for item in [f"model.path={model_dir}", f"dataset.path={data_dir}", f"saving.runs_dir={runs_dir}",
                 "dataset.resolution=32", "dataset.batch_size=2", "network.rank=4", "schedule.max_steps=3",
                 "run.name=f", "saving.dtype=fp32", *extra]:
        out += ["--set", item]
    return out


def no_traceback(err: str) -> bool:
    return "Traceback" not in err and "File \"" not in err


# 13: the machine fails under the run ------------------------------------------------------------------------------

def test_a_full_disk_mid_run_ends_in_a_failed_event_and_keeps_earlier_checkpoints(
        tiny_model_dir, image_dir, tmp_path, capsys, monkeypatch):
    import trainer.checkpoint as ck
    real, calls = ck.save_file, {"n": 0}

    def full_disk(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:  # the first checkpoint's two files are written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(ck, "save_file", full_disk)
    code = main(["train", *cli_sets(tiny_model_dir, image_dir, tmp_path / "runs", "schedule.max_steps=4",
                                    "saving.every_n_steps=2")])
    err = capsys.readouterr().err
    assert code == 1 and "No space left on device" in err and no_traceback(err), err
    run_dir, = (tmp_path / "runs").iterdir()
    failed = [e for e in read_events(run_dir / "events.jsonl") if isinstance(e, Failed)]
    assert failed and "space" in failed[-1].advice.lower()
    assert [p.name for p in runs.checkpoint_dirs(run_dir)] == ["step-000002"]
    assert runs.run_info(run_dir).state == "failed"


def test_a_read_only_runs_folder_is_one_line(tiny_model_dir, image_dir, tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):  # chmod cannot stop root (CI may run as root): the OS's answer instead
        if Path(self).is_relative_to(ro):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    code = main(["train", *cli_sets(tiny_model_dir, image_dir, ro)])
    err = capsys.readouterr().err
    assert code == 2 and str(ro) in err and "Read-only" in err and no_traceback(err), err


def test_a_cache_folder_that_is_a_file_is_a_failed_run_with_a_reason(tiny_model_dir, image_dir, tmp_path, capsys):
    (tmp_path / "cache").write_text("not a folder")
    code = main(["train", *cli_sets(tiny_model_dir, image_dir, tmp_path / "runs", "dataset.cache_latents=disk",
                                    f"dataset.cache_dir={tmp_path / 'cache'}")])
    err = capsys.readouterr().err
    assert code == 1 and "cache" in err and "File exists" in err and no_traceback(err), err
    for run_dir in (tmp_path / "runs").iterdir():
        assert any(isinstance(e, Failed) for e in read_events(run_dir / "events.jsonl"))


def test_running_out_of_cpu_memory_gets_cpu_advice(tiny_model_dir, image_dir, tmp_path, monkeypatch):
    import trainer.loop as loop

    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:114] . DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 1073741824 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(loop, "diffusion_loss", no_memory)
    path, events, _ = train(make_cfg(tiny_model_dir, image_dir, tmp_path))
    failed = [e for e in events if isinstance(e, Failed)][-1]
    assert path is None and "memory" in failed.error and "batch_size" in failed.advice
    assert "CUDA" not in failed.advice or "CPU" in failed.advice


# 14: the disk latent cache ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["wrong shape", "nan", "bit flip"])
def test_a_bad_cache_entry_is_recomputed_with_a_warning(tiny_model_dir, image_dir, tmp_path, damage):
    cfg = make_cfg(tiny_model_dir, image_dir, tmp_path, **{"dataset.cache_latents": "disk",
                                                           "dataset.cache_dir": str(tmp_path / "cache")})
    clean, _, _ = train(cfg)
    for entry in (tmp_path / "cache").glob("*.safetensors"):
        from safetensors import safe_open
        with safe_open(str(entry), "pt") as f:
            meta = f.metadata()
        tensors = load_file(str(entry))
        t = tensors["latents"]
        if damage == "wrong shape":
            t = t[..., :-1].contiguous()
        elif damage == "nan":
            t = t.clone()
            t.view(-1)[0] = float("nan")
        if damage == "bit flip":
            raw = bytearray(entry.read_bytes())
            raw[-3] ^= 0x10
            entry.write_bytes(bytes(raw))
        else:
            save_file({"latents": t}, str(entry), metadata=meta)
    again, events, _ = train(cfg)
    warnings = [e.text for e in events if isinstance(e, Message)]
    assert any("cache" in w and "recomputed" in w for w in warnings), warnings
    assert again is not None
    assert all(torch.equal(a, b) for a, b in zip(load_file(str(clean)).values(), load_file(str(again)).values()))


# 15: adapters that do nothing or draw black -----------------------------------------------------------------------

def test_alpha_zero_is_refused(tiny_model_dir, image_dir, tmp_path, capsys):
    preset = Path(__file__).resolve().parent.parent / "presets" / "tiny-demo.toml"
    code = main(["validate", "--config", str(preset),
                 *cli_sets(tiny_model_dir, image_dir, tmp_path / "runs", "network.alpha=0")])
    assert code == 2 and "network.alpha is 0" in capsys.readouterr().err


def fitting_adapter(model_dir, path: Path, nan: bool = False, width: int | None = None) -> Path:
    """A one-layer adapter of the tiny model's first attention query (of another width when asked)."""
    from trainer.models.meta import model_index
    name, (_, _, module) = next((k, v) for k, v in model_index(str(model_dir)).items() if k.endswith("attn1_to_q"))
    out_features, in_features = module.weight.shape
    down, up = torch.randn(2, width or in_features), torch.randn(width or out_features, 2)
    if nan:
        up[0, 0] = float("nan")
    return save_adapter(Adapter(layers={name: LoraLayer(down, up, 2.0)}), path, format="kohya", dtype="fp32")


def test_a_nan_adapter_is_refused_at_load_by_the_cli_and_the_app(tiny_model_dir, tmp_path, capsys):
    from app import generation as G
    from app.files import UploadError
    from app.settings import AppSettings
    bad = fitting_adapter(tiny_model_dir, tmp_path / "nan.safetensors", nan=True)
    code = main(["generate", "--model", str(tiny_model_dir), "--lora", f"{bad}:1.0", "--prompt", "x", "--steps", "1",
                 "--width", "64", "--height", "64", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and "NaN" in err and no_traceback(err), err
    assert not (tmp_path / "x.png").exists()
    s = AppSettings(adapters_dir=tmp_path / "adapters", base_model=str(tiny_model_dir))
    with pytest.raises(UploadError, match="NaN"):
        G.add_adapter_upload(s, str(bad))
    assert not (tmp_path / "adapters").exists() or not any((tmp_path / "adapters").iterdir())


# 16: failures always reach stderr, and say only what is true ------------------------------------------------------

def test_quiet_still_says_why_a_run_failed_and_no_checkpoint_is_claimed(tiny_model_dir, image_dir, tmp_path, capsys,
                                                                         monkeypatch):
    import trainer.loop as loop
    monkeypatch.setattr(loop, "diffusion_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    code = main(["train", "--quiet", *cli_sets(tiny_model_dir, image_dir, tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 1 and "training failed" in err and "nan" in err.lower()
    assert "last good checkpoint is kept" not in err


# 17: toolkit errors are messages ----------------------------------------------------------------------------------

def test_an_unknown_target_module_is_exit_2(tiny_model_dir, image_dir, tmp_path, capsys):
    code = main(["train", *cli_sets(tiny_model_dir, image_dir, tmp_path / "runs", "network.unet_targets=['nope']")])
    err = capsys.readouterr().err
    assert code == 2 and "nope" in err and no_traceback(err), err


def test_an_unwritable_out_of_blend_and_generate_is_exit_2(tiny_model_dir, tmp_path, capsys):
    good = fitting_adapter(tiny_model_dir, tmp_path / "a.safetensors")
    (tmp_path / "file").write_text("x")
    for argv in (["blend", f"{good}:1.0", "--out", str(tmp_path / "file" / "b.safetensors")],
                 ["generate", "--model", str(tiny_model_dir), "--lora", f"{good}:1.0", "--prompt", "x", "--steps",
                  "1", "--width", "64", "--height", "64", "--out", str(tmp_path / "file" / "x.png")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "file" in err and no_traceback(err), err


# 19: uploads ------------------------------------------------------------------------------------------------------

def png_bytes(colour=(9, 9, 9)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, "PNG")
    return buf.getvalue()


def test_an_adapter_upload_that_does_not_fit_the_base_is_refused_before_it_is_stored(tiny_model_dir, tmp_path):
    from app import generation as G
    from app.files import UploadError
    from app.settings import AppSettings
    wrong = fitting_adapter(tiny_model_dir, tmp_path / "sd15ish.safetensors", width=320)
    s = AppSettings(adapters_dir=tmp_path / "adapters", base_model=str(tiny_model_dir))
    with pytest.raises(UploadError, match="does not fit"):
        G.add_adapter_upload(s, str(wrong), str(tiny_model_dir))
    assert not (tmp_path / "adapters").exists() or not any((tmp_path / "adapters").iterdir())


def test_a_zip_keeps_its_repeat_folders_and_shortens_an_overlong_name(tmp_path):
    from app import datasets as D
    from app.settings import AppSettings
    from app.tabs import dataset as tab
    s = AppSettings(data_dir=tmp_path / "datasets")
    D.create_dataset(s.data_dir, "d")
    archive = tmp_path / "up.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("10_dog/a.png", png_bytes())
        z.writestr("10_dog/a.txt", "a dog")
        z.writestr("b.png", png_bytes((1, 2, 3)))
        z.writestr("é" * 130 + ".png", png_bytes((4, 5, 6)))  # 264 bytes in UTF-8
    text = tab.upload(s, "d", [str(archive)])
    assert "Added 3 image(s), 1 caption(s)." == text, text
    names = sorted(i.name for i in D.load_items(s.data_dir / "d"))
    assert names[:2] == ["10_dog/a.png", "b.png"] and names[2].startswith("é" * 90) and names[2].endswith(".png")
    assert len(names[2].encode("utf-8")) <= 200
    from trainer import TrainConfig, scan_dataset
    cfg = TrainConfig()
    cfg.dataset.path = str(s.data_dir / "d")
    repeats = {i.path.name: i.repeats for i in scan_dataset(cfg.dataset).items}
    assert (repeats["a.png"], repeats["b.png"]) == (10, 1)


def test_a_read_only_dataset_with_a_disk_cache_is_a_failed_run_that_names_the_fix(
        tiny_model_dir, image_dir, tmp_path, capsys, monkeypatch):
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if Path(self).is_relative_to(image_dir):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    code = main(["train", "--quiet", *cli_sets(tiny_model_dir, image_dir, tmp_path / "runs",
                                               "dataset.cache_latents=disk")])
    err = capsys.readouterr().err
    assert code == 1 and ".loradesk-cache" in err and "dataset.cache_dir" in err and no_traceback(err), err
