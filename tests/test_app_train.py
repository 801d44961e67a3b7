"""Train tab handlers, called directly: the form mirrors the config, problems land on their fields, and a real
tiny training is started, followed, refused a second time, stopped with a usable adapter, and resumed."""
import time
from pathlib import Path

import pytest

from app import training as T
from app.settings import AppSettings
from app.tabs import train as tab
from trainer import config as C


@pytest.fixture
def settings(tmp_path) -> AppSettings:
    return AppSettings(data_dir=tmp_path / "datasets", runs_dir=tmp_path / "runs", adapters_dir=tmp_path / "ad")


def form_values(cfg: C.TrainConfig, **changes) -> list:
    values = dict(zip([i.key for i in T.form_fields()], T.config_to_values(cfg)))
    values.update({k.replace("__", "."): v for k, v in changes.items()})
    return [values[i.key] for i in T.form_fields()]


def test_the_form_has_one_widget_per_config_field_of_the_right_kind():
    import gradio as gr
    infos = T.form_fields()
    assert [i.key for i in infos] == [i.key for i in C.fields()]
    kinds = {i.key: type(tab.component_for(i, i.default)) for i in infos}
    assert kinds["network.rank"] is gr.Number and kinds["optimizer.name"] is gr.Dropdown
    assert kinds["network.text_encoder"] is gr.Checkbox and kinds["sampling.prompts"] is gr.Textbox
    alpha = tab.component_for(C.field_info("network.alpha"), 8.0)
    assert "scaled by alpha/rank" in alpha.info
    assert tab.component_for(C.field_info("dataset.resolution"), 512).info.endswith("(32 to 4096)")
    assert tab.component_for(C.field_info("network.rank"), 8).minimum is None  # validate() reports it, by the field


def test_form_values_round_trip_through_the_config():
    cfg = C.TrainConfig()
    cfg.network.rank, cfg.sampling.prompts = 16, ["one prompt", "two"]
    values = T.config_to_values(cfg)
    assert "one prompt\ntwo" in values
    back, errors = T.values_to_config(values)
    assert C.dumps(back) == C.dumps(cfg)
    assert set(errors) == {"dataset.path"}  # the defaults lack only a dataset


def test_problems_are_keyed_by_the_field_they_are_about(tmp_path):
    cfg = C.TrainConfig()
    cfg.dataset.path = str(tmp_path)
    errors, summary = tab.check_form(form_values(cfg, network__rank=0, dataset__resolution=100,
                                                 optimizer__unet_lr="fast", run__name="bad name"))
    assert set(errors) == {"network.rank", "dataset.resolution", "optimizer.unet_lr", "run.name"}
    assert errors["network.rank"].startswith("network.rank is 0; it must be at least 1")
    assert "multiple of 8" in errors["dataset.resolution"]
    assert summary.startswith("4 setting(s) need a fix")
    assert tab.check_form(form_values(cfg))[1] == "Ready to start."


def test_presets_fill_the_form_but_keep_this_apps_model_runs_and_dataset(settings, tmp_path, monkeypatch):
    assert "tiny-demo" in T.list_presets(settings)
    s = AppSettings(runs_dir=settings.runs_dir, base_model="/models/mine")
    cfg = T.load_preset(s, "tiny-demo", str(tmp_path))
    assert cfg.schedule.max_steps == C.load(s.presets_dir / "tiny-demo.toml").schedule.max_steps
    assert (cfg.model.path, cfg.saving.runs_dir, cfg.dataset.path) == ("/models/mine", str(s.runs_dir),
                                                                       str(tmp_path))
    monkeypatch.chdir(tmp_path)  # the demo's regularization folder is found beside presets/ from anywhere
    reg = Path(T.load_preset(s, "tiny-demo", str(tmp_path)).dataset.regularization_path)
    assert reg.is_absolute() and reg.is_dir() and reg == s.presets_dir.parent / "examples" / "demo-regularization"
    assert Path(T.load_preset(s, "tiny-demo").dataset.path) == s.presets_dir.parent / "examples" / "demo-concept"


def test_start_refuses_an_invalid_form_naming_the_field(settings):
    with pytest.raises(T.AppError, match="dataset.path is empty"):
        tab.start(settings, form_values(C.TrainConfig()))


def test_start_is_refused_while_images_are_generated(settings, tmp_path):
    from app import generation as G
    cfg = T.default_config(settings)
    cfg.dataset.path = str(tmp_path)
    assert G.hold_device()
    try:
        with pytest.raises(T.AppError, match="Images are being generated"):
            T.start_run(settings, cfg)
    finally:
        G.free_device()
    assert not list(settings.runs_dir.glob("*"))  # nothing was started


def test_run_view_reads_progress_samples_and_oom_advice_from_the_folder(settings):
    from trainer.events import EventLog, Failed, Progress, SampleWritten, Started
    run_dir = settings.runs_dir / "demo-20260101-000000"
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text(C.dumps(C.TrainConfig()))
    log = EventLog(run_dir / "events.jsonl")
    log(Started(str(run_dir), total_steps=10, pid=999_999_999))
    for step in (1, 2):
        log(Progress(step, 10, loss=1.0 / step, lr=1e-4, it_per_s=2.0, eta_s=4.0))
    log(SampleWritten(2, [str(run_dir / "s.png")], ["a prompt"]))
    view = T.run_view(run_dir)
    assert (view.step, view.total_steps, view.losses) == (2, 10, [(1, 1.0), (2, 0.5)])
    assert view.samples == [(str(run_dir / "s.png"), "step 2: a prompt")] and view.fraction == 0.2
    log(Failed(2, error="CUDA out of memory. Tried to allocate 2 GiB"))
    live = tab.live(settings, None)
    assert live["state"] == "failed" and "out of memory" in live["failure"]
    assert "gradient_checkpointing" in live["failure"] and "batch_size" in live["failure"]
    assert 'aria-valuenow="20"' in live["progress"]
    assert T.runs_table(settings)[0][:3] == ["demo-20260101-000000", "failed", "2/10"]
    info = T.run_info(run_dir)
    assert T.run_info(run_dir) is info  # a finished run's folder is not re-read every second
    log(Started(str(run_dir), total_steps=10, start_step=2, pid=999_999_999))  # a resume changes the file
    assert T.run_info(run_dir) is not info
    from app.generation import export_run_adapter
    with pytest.raises(T.AppError, match="has no adapter yet"):
        export_run_adapter(run_dir, settings.adapters_dir)


def test_event_tail_reads_only_complete_new_lines(tmp_path):
    path = tmp_path / "events.jsonl"
    tail = T.EventTail(path)
    assert tail.read() == []
    path.write_text('{"type": "message", "level": "info", "text": "a"}\n{"type": "mess')
    assert [e.text for e in tail.read()] == ["a"]
    with open(path, "a") as f:
        f.write('age", "level": "info", "text": "b"}\n')
    assert [e.text for e in tail.read()] == ["a", "b"]


def test_the_loss_plot_is_thinned_but_keeps_the_latest_step():
    frame = tab.loss_frame([(s, 1.0 / s) for s in range(1, 5002)])
    assert len(frame) <= tab.MAX_PLOT_POINTS + 1 and frame["step"].iloc[-1] == 5001 and frame["step"].iloc[0] == 1
    assert list(tab.loss_frame([(1, 0.5), (2, 0.25)])["loss"]) == [0.5, 0.25]


def test_format_eta():
    assert [T.format_eta(s) for s in (0, 5, 65, 3700)] == ["-", "5s", "1m 05s", "1h 01m"]


# ----------------------------------------------------------------------------------------------------------------
# a real run on the tiny model, in its own process

def wait_for(predicate, timeout=180.0, what="condition"):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_a_real_run_starts_refuses_a_second_stops_with_an_adapter_and_resumes(tmp_path, tiny_model_dir,
                                                                              image_dir):
    import torch
    from trainer.formats import load_adapter
    from app import generation as G
    s = AppSettings(data_dir=tmp_path / "datasets", runs_dir=tmp_path / "runs", base_model=str(tiny_model_dir))
    cfg = T.default_config(s)
    values = form_values(cfg, dataset__path=str(image_dir), dataset__resolution=32, schedule__max_steps=200,
                         network__rank=2, network__alpha=2.0, run__name="app-test", dataset__cache_latents="off")
    run_dir, text = tab.start(s, values)
    assert text == f"Started **{run_dir.name}**." and run_dir.parent == s.runs_dir
    wait_for(lambda: T.run_view(run_dir).step >= 1, what="the first step")
    assert T.active_run(s) == run_dir
    with pytest.raises(T.AppError, match="still training"):
        tab.start(s, values)
    with pytest.raises(T.AppError, match="Generation waits"):
        G.generate(s, "", [], "a red square")
    live = tab.live(s, None)  # a second browser tab with no state of its own follows the active run
    assert live["run_dir"] == run_dir and live["state"] == "running" and live["losses"]
    T.send(run_dir, "stop")
    view = wait_for(lambda: (v := T.run_view(run_dir)).state != "running" and v, what="the stop")
    assert view.state == "stopped" and view.step < 200
    assert load_adapter(view.adapter_path).layers
    exported = G.export_run_adapter(run_dir, tmp_path / "exports")  # the Download button: kohya, fp16
    assert exported.name == "app-test-kohya-fp16.safetensors"
    from safetensors import safe_open
    with safe_open(str(exported), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
        assert any(k.endswith(".lora_down.weight") for k in f.keys())
    assert load_adapter(exported).layers.keys() == load_adapter(view.adapter_path).layers.keys()
    stopped_at = view.step
    T.resume_run(s, run_dir)
    wait_for(lambda: T.run_view(run_dir).step > stopped_at, what="the resumed run's next step")
    T.send(run_dir, "stop")
    wait_for(lambda: T.run_view(run_dir).state == "stopped", what="the second stop")
    assert T.active_run(s) is None
    from trainer.events import Started
    starts = [e for e in T.run_events(run_dir) if isinstance(e, Started)]
    assert [e.start_step for e in starts] == [0, stopped_at]  # resumed from the stop, not from scratch
    log = T.read_log(run_dir)
    assert (run_dir / "train.log").stat().st_size > 0 and log == (run_dir / "train.log").read_text()[-20_000:]


def test_the_periodic_refresh_never_writes_the_picked_run_back(settings):
    # a tick that echoed the picked value lost a pick made while it was in flight (the browser test's export failed)
    from app.main import build_app
    demo = build_app(settings)
    ticks = [f for f in demo.fns.values() if any(ev == "tick" for _, ev in f.targets)
             and "run-picker" in [getattr(o, "elem_id", None) for o in f.outputs]]
    assert ticks, "the runs list is refreshed by a timer"
    for f in ticks:
        out = dict(zip([getattr(o, "elem_id", None) for o in f.outputs], f.fn(*[None] * len(f.inputs))))
        assert "choices" in out["run-picker"] and "value" not in out["run-picker"]
