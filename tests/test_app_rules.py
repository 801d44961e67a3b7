"""Issue 13's measured defects: the app must apply the engine's rules, not copies of them (one test each)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny import make_images
from trainer import config as C
from trainer import runs
from trainer.loop import Trainer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def rank4_alpha1_run(tiny_model_dir, tmp_path_factory):
    """A short run at rank 4, alpha 1 (scale 1/4) with checkpoints at steps 2 and 4, and no final adapter."""
    root = tmp_path_factory.mktemp("ckpt-run")
    cfg = C.TrainConfig()
    for key, value in {"model.path": str(tiny_model_dir), "dataset.path": str(make_images(root / "data")),
                       "dataset.resolution": 32, "network.rank": 4, "network.alpha": 1.0,
                       "optimizer.unet_lr": 1e-2, "schedule.max_steps": 4, "saving.every_n_steps": 2,
                       "saving.runs_dir": str(root / "runs"), "run.name": "r4a1", "saving.dtype": "fp32"}.items():
        C.set_value(cfg, key, value)
    run_dir = runs.create_run_dir(C.check(cfg))
    final = Trainer(cfg, run_dir).run()
    final.unlink()  # as for a run killed before its end: only checkpoints are left
    return run_dir


def deltas(adapter) -> dict:
    return {name: layer.delta() for name, layer in adapter.layers.items()}


def assert_same_deltas(a, b):
    da, db = deltas(a), deltas(b)
    assert da.keys() == db.keys() and da
    for name in da:
        assert torch.allclose(da[name], db[name], atol=1e-6, rtol=1e-5), name


# 1. checkpoint adapters at their trained strength -----------------------------------------------------------------

def test_generate_tab_draws_checkpoints_at_their_trained_strength(rank4_alpha1_run, tmp_path):
    from app import generation as G
    from app.settings import AppSettings
    from trainer.formats import load_adapter
    s = AppSettings(data_dir=tmp_path / "d", runs_dir=rank4_alpha1_run.parent, adapters_dir=tmp_path / "a")
    trained = load_adapter(runs.last_checkpoint(rank4_alpha1_run) / "adapter.safetensors")
    assert {layer.scale for layer in trained.layers.values()} == {0.25}
    picked = [path for label, path in G.adapter_choices(s) if "step-000004" in label]
    assert len(picked) == 1
    assert_same_deltas(load_adapter(picked[0]), trained)
    rows = G.checkpoint_rows(rank4_alpha1_run)  # the per-checkpoint comparison grid
    assert_same_deltas(load_adapter(rows[-1]), trained)
    exported = G.export_run_adapter(rank4_alpha1_run, tmp_path / "exports", "kohya", "fp32")  # Download fallback
    assert_same_deltas(load_adapter(exported), trained)


def test_blend_takes_a_checkpoint_folder_or_a_run_folder(rank4_alpha1_run, tmp_path):
    from trainer.formats import load_adapter
    ckpt = runs.last_checkpoint(rank4_alpha1_run)
    trained = load_adapter(ckpt / "adapter.safetensors")
    for source in (ckpt, rank4_alpha1_run):
        out = tmp_path / f"{source.name}.safetensors"
        done = subprocess.run([sys.executable, "-m", "trainer", "blend", f"{source}:1.0", "--out", str(out),
                               "--dtype", "fp32"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert_same_deltas(load_adapter(out), trained)
    from trainer.__main__ import main
    for command in (["export", str(ckpt), "--dtype", "fp32"], ["resize", str(rank4_alpha1_run), "--rank", "4",
                                                               "--dtype", "fp32"]):
        out = tmp_path / f"{command[0]}.safetensors"
        assert main(command + ["--out", str(out)]) == 0
        assert_same_deltas(load_adapter(out), trained)  # resize to the same rank keeps every delta


# 2. the trigger button follows the trainer's whole-word rule -------------------------------------------------------

def test_trigger_button_keeps_captions_that_already_hold_the_trigger(tmp_path):
    from app import datasets as D
    from trainer.data import with_trigger
    folder = make_images(tmp_path / "demo", n=2, caption="a zqx circle on a purple background")
    (folder / "img1.txt").write_text("a red circle", encoding="utf-8")
    D.apply_trigger(folder, "zqx")
    assert (folder / "img0.txt").read_text(encoding="utf-8").strip() == "a zqx circle on a purple background"
    assert (folder / "img1.txt").read_text(encoding="utf-8").strip() == with_trigger("a red circle", "zqx")


# 3. the Dataset tab reads captions and lists images as the trainer does --------------------------------------------

def test_dataset_tab_shows_what_the_trainer_trains_on(tmp_path):
    from app.settings import AppSettings
    from app.tabs import dataset as tab
    from trainer.config import DatasetSection
    from trainer.data import scan_dataset
    s = AppSettings(data_dir=tmp_path / "datasets")
    folder = make_images(s.data_dir / "d", n=2, caption=None)
    (folder / "img0.txt").write_bytes("caf\xe9 au lait".encode("cp1252"))
    make_images(folder / "__MACOSX", n=1, caption=None)
    gallery = tab.gallery_value(s, "d")
    trained = scan_dataset(DatasetSection(path=str(folder)))
    assert sorted(Path(p).name for p, _ in gallery) == sorted(i.path.name for i in trained.items)
    assert "café au lait" in [c for _, c in gallery]
    item, _, caption = tab.select(s, "d", 0)
    assert caption == "café au lait"
    tab.save_caption(s, "d", item, caption + ", in a cup")
    assert (folder / "img0.txt").read_text(encoding="utf-8").strip() == "café au lait, in a cup"


# 4. the Train form runs the machine checks before a run folder exists ----------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_train_form_refuses_fp16_without_cuda_before_making_a_run(tmp_path, tiny_model_dir):
    from app import forms as F
    from app.settings import AppSettings
    from app.tabs import train as tab
    s = AppSettings(data_dir=tmp_path / "d", runs_dir=tmp_path / "runs", base_model=str(tiny_model_dir))
    cfg = tab.initial_config(s)
    cfg.dataset.path = str(make_images(tmp_path / "data"))
    cfg.precision.mixed = "fp16"
    errors, _ = tab.check_form(s, F.config_to_values(cfg))
    assert "fp16 needs a CUDA GPU" in errors["precision.mixed"]  # shown by the field as soon as it is picked
    with pytest.raises(Exception, match="fp16 needs a CUDA GPU"):
        tab.start(s, F.config_to_values(cfg))
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


# 5. blend export works with the fields as a fresh page shows them --------------------------------------------------

def blocks_fn(demo, elem_id: str, event: str = "click"):
    """The handler that this event of the widget with this elem_id triggers."""
    for fn in demo.fns.values():
        for target, name in fn.targets:
            block = demo.blocks.get(target) if isinstance(target, int) else target
            if getattr(block, "elem_id", None) == elem_id and name == event:
                return fn
    raise AssertionError(f"no {event} handler for #{elem_id}")


def page_value(block):
    """What a fresh page sends for a widget: its value, and 0 for an empty number box (the browser shows 0)."""
    import gradio as gr
    value = None if callable(block.value) else block.value
    if isinstance(block, gr.Number) and value is None:
        value = 0
    return value


def test_blend_export_works_with_the_default_rank_field(tmp_path, tiny_model_dir, rank4_alpha1_run):
    from app.main import build_app
    from app.settings import AppSettings
    s = AppSettings(data_dir=tmp_path / "d", runs_dir=rank4_alpha1_run.parent, adapters_dir=tmp_path / "a",
                    base_model=str(tiny_model_dir))
    demo = build_app(s)
    fn = blocks_fn(demo, "blend-btn")
    values = []
    for block in fn.inputs:
        value = page_value(block)
        if getattr(block, "elem_id", "") == "slot-0-adapter":
            value = str(runs.last_checkpoint(rank4_alpha1_run))
        values.append(block.preprocess(value) if value is not None else None)
    fn.fn(*values)
    assert list((tmp_path / "a").glob("blend-*.safetensors"))


# 6. a failed action shows one message and leaves every widget usable ----------------------------------------------

def test_a_bad_adapter_upload_is_one_message_without_server_paths(tmp_path, tiny_model_dir, monkeypatch):
    import json
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))  # where Gradio puts a browser's upload
    from app.main import build_app
    from app.settings import AppSettings
    s = AppSettings(data_dir=tmp_path / "d", runs_dir=tmp_path / "r", adapters_dir=tmp_path / "a",
                    base_model=str(tiny_model_dir))
    fn = blocks_fn(build_app(s), "adapter-upload", "upload")
    upload_dir = tmp_path / "gradio" / "3f9c2a"
    upload_dir.mkdir(parents=True)
    junk = upload_dir / "junk.safetensors"
    junk.write_bytes(b"garbage")
    outputs = fn.fn(str(junk), str(tiny_model_dir))  # a user error is an answer, not an exception (which turns
    # widgets into pills); the second input is the tab's base model box
    shown = json.dumps(outputs, default=str)
    assert "junk.safetensors" in shown and str(upload_dir) not in shown
    updates = [o for o in outputs if isinstance(o, dict)]
    assert all("value" not in o and "choices" not in o for o in updates[:4]), "the slots keep what they hold"


# found in review -------------------------------------------------------------------------------------------------

def test_a_form_list_keeps_commas_inside_one_item(tmp_path):
    from app import forms as F
    cfg = C.TrainConfig()
    cfg.sampling.prompts = ["a photo of zqx, smiling"]
    back, _ = F.values_to_config(F.config_to_values(cfg), str(tmp_path))
    assert back.sampling.prompts == ["a photo of zqx, smiling"]


def test_an_unknown_home_folder_is_a_field_problem_not_a_crash(tmp_path):
    from app import forms as F
    from app.settings import AppSettings
    from app.tabs import train as tab
    cfg = C.TrainConfig()
    cfg.dataset.path = "~nosuchuser-loradesk/data"
    errors, _ = tab.check_form(AppSettings(runs_dir=tmp_path), F.config_to_values(cfg))
    assert "no user 'nosuchuser-loradesk'" in errors["dataset.path"]


def test_downloads_are_named_by_what_they_are(rank4_alpha1_run, tmp_path):
    from app import generation as G
    out = G.export_run_adapter(rank4_alpha1_run, tmp_path / "exports", "kohya", "fp32")
    assert out.name == "r4a1-step-4-kohya-fp32.safetensors"  # no final adapter: the newest checkpoint's, named so


def test_messages_keep_user_folders_and_drop_upload_folders(tmp_path, monkeypatch):
    from app.errors import user_message
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    text = user_message(ValueError(f"{tmp_path}/gradio/ab12/x.safetensors is bad; see {tmp_path}/data/y.png"))
    assert text == f"x.safetensors is bad; see {tmp_path}/data/y.png"
    assert user_message(ValueError("/tmp/loradesk-upload-k2j/zip0/a/b.png: truncated")) == "b.png: truncated"


def test_a_crash_while_loading_still_ends_in_a_failed_event(tmp_path, tiny_model_dir, monkeypatch):
    from trainer import read_events, run_info
    from trainer.job import run_here
    from trainer.loop import Trainer

    def out_of_memory(self):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(Trainer, "_setup_model", out_of_memory)
    cfg = C.TrainConfig()
    cfg.model.path, cfg.dataset.path = str(tiny_model_dir), str(make_images(tmp_path / "data"))
    cfg.saving.runs_dir = str(tmp_path / "runs")
    run_dir = runs.create_run_dir(cfg)
    with pytest.raises(torch.OutOfMemoryError):
        run_here(run_dir)
    failed = [e for e in read_events(run_dir / "events.jsonl") if e.kind == "failed"]
    assert len(failed) == 1 and "out of memory" in failed[0].error
    info = run_info(run_dir)
    assert info.state == "failed" and "gradient_checkpointing" in info.advice


def test_the_cli_reports_an_unwritable_runs_folder_in_one_line(tmp_path, capsys):
    from trainer.__main__ import main
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code = main(["train", "--set", f"dataset.path={make_images(tmp_path / 'data')}",
                 "--set", f"saving.runs_dir={blocker / 'runs'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err
