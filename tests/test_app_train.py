"""Train tab handlers, called directly: the form mirrors the config, problems land on their fields, and a real
tiny training is started, followed, refused a second time, stopped with a usable adapter, and resumed."""
from pathlib import Path

import pytest

from tiny import make_images, wait_for
from app import forms as F
from app import runview as V
from app.errors import AppError
from app.settings import AppSettings
from app.tabs import train as tab
from trainer import config as C


@pytest.fixture
def settings(tmp_path) -> AppSettings:
    return AppSettings(data_dir=tmp_path / "datasets", runs_dir=tmp_path / "runs", adapters_dir=tmp_path / "ad",
                       import_dirs=(tmp_path,))  # the tests keep their images beside the app folders


def form_values(cfg: C.TrainConfig, **changes) -> list:
    values = dict(zip([i.key for i in F.form_fields()], F.config_to_values(cfg)))
    values.update({k.replace("__", "."): v for k, v in changes.items()})
    return [values[i.key] for i in F.form_fields()]


def test_the_form_has_one_widget_per_config_field_of_the_right_kind():
    import gradio as gr
    infos = F.form_fields()
    # the trigger lives with the dataset (Dataset tab), the runs and cache folders are the app's, and the text
    # encoders are one row per encoder of the base model (test_the_text_encoder_rows_follow_the_base_models_family)
    elsewhere = ("dataset.trigger", "saving.runs_dir", "dataset.cache_dir", "network.text_encoders",
                 "optimizer.text_encoder_lr", "optimizer.text_encoder_lrs")
    assert [i.key for i in infos] == [i.key for i in C.fields() if i.key not in elsewhere]
    kinds = {i.key: type(tab.component_for(i, i.default)) for i in infos}
    assert kinds["network.rank"] is gr.Number and kinds["optimizer.name"] is gr.Dropdown
    assert kinds["dataset.flip"] is gr.Checkbox and kinds["sampling.prompts"] is gr.Textbox
    alpha = tab.component_for(C.field_info("network.alpha"), 8.0)
    assert "scaled by alpha/rank" in alpha.info
    assert tab.component_for(C.field_info("dataset.resolution"), 512).info.endswith("(32 to 4096)")
    assert tab.component_for(C.field_info("network.rank"), 8).minimum is None  # validate() reports it, by the field


def test_form_values_round_trip_through_the_config():
    cfg = C.TrainConfig()
    cfg.network.rank, cfg.sampling.prompts = 16, ["one prompt", "two"]
    values = F.config_to_values(cfg)
    assert "one prompt\ntwo" in values
    back, errors = F.values_to_config(values, cfg.saving.runs_dir)
    assert C.dumps(back) == C.dumps(cfg)
    assert set(errors) == {"dataset.path"}  # the defaults lack only a dataset


def test_problems_are_keyed_by_the_field_they_are_about(tmp_path):
    cfg = C.TrainConfig()
    cfg.dataset.path = str(tmp_path)
    s = AppSettings(runs_dir=tmp_path / "runs", import_dirs=(tmp_path,))
    errors, summary = tab.check_form(s, form_values(cfg, network__rank=0, dataset__resolution=100,
                                                    optimizer__unet_lr="fast", run__name="bad name"))
    assert set(errors) == {"network.rank", "dataset.resolution", "optimizer.unet_lr", "run.name"}
    assert errors["network.rank"].startswith("network.rank is 0; it must be at least 1")
    assert "multiple of 8" in errors["dataset.resolution"]
    assert summary.startswith("4 setting(s) need a fix")
    assert tab.check_form(s, form_values(cfg))[1] == "Ready to start."


def test_a_preset_sets_training_settings_and_keeps_the_users_dataset(settings, tmp_path, monkeypatch):
    from trainer import apply_preset, default_config, list_presets
    assert "tiny-demo" in [p.stem for p in list_presets()]
    mine = default_config("/models/mine", str(settings.runs_dir))
    mine.dataset.path, mine.sampling.prompts = str(tmp_path), ["my dog on a sofa"]
    cfg, notes = apply_preset(mine, "tiny-demo")
    demo = C.load(settings.presets_dir / "tiny-demo.toml")
    assert (cfg.schedule.max_steps, cfg.network.rank) == (demo.schedule.max_steps, demo.network.rank)
    assert (cfg.model.path, cfg.saving.runs_dir, cfg.dataset.path) == ("/models/mine", str(settings.runs_dir),
                                                                       str(tmp_path))
    assert (cfg.dataset.trigger, cfg.dataset.regularization_path, cfg.sampling.prompts) == (
        "", "", ["my dog on a sofa"]), "the demo's trigger, regularization images and prompts are its own"
    assert notes == ["Kept your dataset and sample prompts.",
                     "Not taken from the preset: its regularization folder and trigger (they belong to its own "
                     "dataset)."]
    cfg, notes = apply_preset(mine, "sd15-character")  # made for SD1.5: the user's own model stays
    assert cfg.model.path == "/models/mine" and notes[0].startswith("Kept your base model")
    on_tiny = default_config("", str(settings.runs_dir))
    on_tiny.dataset.path = str(tmp_path)
    cfg, notes = apply_preset(on_tiny, "sd15-character")  # the built-in model gives way to the preset's
    assert cfg.model.path == "models/v1-5-pruned-emaonly.safetensors" and "set model.path" in notes[0]
    assert (cfg.dataset.resolution, cfg.network.rank) == (512, 16)


def test_with_no_dataset_a_preset_brings_its_example_and_says_so(settings, tmp_path, monkeypatch):
    from trainer import apply_preset, default_config
    monkeypatch.chdir(tmp_path)  # the demo's folders are found beside presets/ from anywhere
    cfg, notes = apply_preset(default_config("", str(settings.runs_dir)), "tiny-demo")
    examples = settings.presets_dir.parent / "examples"
    assert Path(cfg.dataset.path) == examples / "demo-concept"
    assert Path(cfg.dataset.regularization_path) == examples / "demo-regularization"
    assert len(notes) == 1 and "no dataset yet" in notes[0] and "demo-concept" in notes[0]


def test_form_defaults_follow_the_base_model(settings, tiny_model_dir):
    from trainer import default_config
    tiny = tab.initial_config(settings)  # no base model set: the built-in tiny one
    assert (tiny.dataset.resolution, tiny.schedule.max_steps) == (64, 300)
    other = default_config(str(tiny_model_dir))
    assert other.dataset.resolution == 16 and other.schedule.max_steps == C.TrainConfig().schedule.max_steps  # 8 x 2
    assert default_config("/models/v1-5.safetensors").dataset.resolution == 512  # a hub id or a missing file


def test_start_refuses_an_invalid_form_naming_the_field(settings):
    with pytest.raises(AppError, match="dataset.path is empty"):
        tab.start(settings, form_values(C.TrainConfig()))


def test_start_is_refused_while_images_are_generated(settings, tmp_path):
    from app import device
    cfg = tab.initial_config(settings)
    cfg.dataset.path = str(make_images(tmp_path / "data"))
    assert device.hold_device()
    try:
        with pytest.raises(AppError, match="Images are being generated"):
            tab.start(settings, F.config_to_values(cfg))
    finally:
        device.free_device()
    assert not list(settings.runs_dir.glob("*"))  # nothing was started


def fake_run(settings):
    """A run folder whose events are written by the test (its process id is one that does not exist)."""
    from trainer.events import EventLog, Started
    run_dir = settings.runs_dir / "demo-20260101-000000"
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text(C.dumps(C.TrainConfig()))
    log = EventLog(run_dir / "events.jsonl")
    log(Started(str(run_dir), total_steps=10, pid=999_999_999))
    return run_dir, log


def test_run_view_reads_progress_samples_and_oom_advice_from_the_folder(settings):
    from trainer import run_info
    from trainer.events import Failed, Progress, SampleWritten, Started
    run_dir, log = fake_run(settings)
    for step in (1, 2):
        log(Progress(step, 10, loss=1.0 / step, lr=1e-4, it_per_s=2.0, eta_s=4.0))
    log(SampleWritten(2, [str(run_dir / "s.png")], ["a prompt"]))
    view = V.run_view(run_dir)
    assert (view.step, view.total_steps, view.losses) == (2, 10, [(1, 1.0), (2, 0.5)])
    assert [(s.step, s.paths, s.prompts) for s in view.samples] == [(2, [str(run_dir / "s.png")], ["a prompt"])]
    assert view.fraction == 0.2
    log(Failed(2, error="CUDA out of memory. Tried to allocate 2 GiB"))
    live = tab.live(settings, None)
    assert live["state"] == "failed" and "out of memory" in live["failure"]
    assert "gradient_checkpointing" in live["failure"] and "batch_size" in live["failure"]
    assert 'aria-valuenow="20"' in live["progress"]
    assert tab.runs_rows(settings)[0][:3] == ["demo-20260101-000000", "failed", "2/10"]
    info = run_info(run_dir)
    assert run_info(run_dir) is info  # a finished run's folder is not re-read every second
    log(Started(str(run_dir), total_steps=10, start_step=2, pid=999_999_999))  # a resume changes the file
    assert run_info(run_dir) is not info
    from app.generation import export_run_adapter
    with pytest.raises(Exception, match="has no adapter yet"):
        export_run_adapter(run_dir, settings.adapters_dir)


def test_the_live_view_sends_only_what_changed(settings):
    from trainer.events import Progress
    _, log = fake_run(settings)
    log(Progress(1, 10, loss=1.0, lr=1e-4, it_per_s=2.0, eta_s=4.0))

    def skipped(value) -> bool:
        return isinstance(value, dict) and value == {"__type__": "update"}

    first, sent = tab.changed(tab.live(settings, None), {})
    assert not any(map(skipped, first)), "a first tick sends everything"
    again, sent = tab.changed(tab.live(settings, None), sent)
    assert all(map(skipped, again)), "an unchanged run sends nothing"
    log(Progress(2, 10, loss=0.5, lr=1e-4, it_per_s=2.0, eta_s=4.0))
    third, _ = tab.changed(tab.live(settings, None), sent)
    kinds = dict(zip(tab.VIEW_KEYS, third))
    assert skipped(kinds["samples"]) and not skipped(kinds["losses"])
    assert list(kinds["losses"]["curve"].unique()) == ["raw", "smoothed"]


def test_event_tail_reads_only_complete_new_lines(tmp_path):
    from trainer.events import EventTail
    path = tmp_path / "events.jsonl"
    tail = EventTail(path)
    assert tail.read() == []
    path.write_text('{"type": "message", "level": "info", "text": "a"}\n{"type": "mess')
    assert [e.text for e in tail.read()] == ["a"]
    with open(path, "a") as f:
        f.write('age", "level": "info", "text": "b"}\n')
    assert [e.text for e in tail.read()] == ["a", "b"]


def test_the_loss_plot_is_thinned_but_keeps_the_latest_step_and_a_smoothed_curve():
    frame = V.loss_frame([(s, 1.0 / s) for s in range(1, 5002)])
    raw = frame[frame["curve"] == "raw"]
    assert len(raw) <= V.MAX_PLOT_POINTS + 1 and raw["step"].iloc[-1] == 5001 and raw["step"].iloc[0] == 1
    frame = V.loss_frame([(1, 0.5), (2, 0.25)])
    assert list(frame[frame["curve"] == "raw"]["loss"]) == [0.5, 0.25]
    assert list(frame[frame["curve"] == "smoothed"]["loss"])[0] == 0.5  # debiased: the first point is itself


def test_format_eta():
    assert [V.format_eta(s) for s in (0, 5, 65, 3700)] == ["-", "5s", "1m 05s", "1h 01m"]


# ----------------------------------------------------------------------------------------------------------------
# a real run on the tiny model, in its own process

@pytest.mark.slow
def test_a_real_run_starts_refuses_a_second_stops_with_an_adapter_and_resumes(tmp_path, tiny_model_dir,
                                                                              image_dir):
    import torch
    from safetensors import safe_open
    from trainer import Started, active_run, read_events
    from trainer.formats import load_adapter
    from app import generation as G
    s = AppSettings(data_dir=tmp_path / "datasets", runs_dir=tmp_path / "runs", base_model=str(tiny_model_dir),
                    import_dirs=(tmp_path,))
    values = form_values(tab.initial_config(s), dataset__path=str(image_dir), dataset__resolution=32,
                         schedule__max_steps=200, network__rank=2, network__alpha=2.0, run__name="app-test",
                         dataset__cache_latents="off")
    run_dir, text = tab.start(s, values)
    assert text == f"Started **{run_dir.name}**." and run_dir.parent == s.runs_dir
    wait_for(lambda: V.run_view(run_dir).step >= 1, what="the first step")
    assert active_run(s.runs_dir).run_dir == run_dir
    with pytest.raises(Exception, match="still training"):
        tab.start(s, values)
    with pytest.raises(AppError, match="Generation waits"):
        G.generate(s, "", [], "a red square")
    live = tab.live(s, None)  # a second browser tab with no state of its own follows the active run
    assert live["run"] == run_dir.name and live["state"] == "running" and live["losses"]
    tab.command(s, run_dir.name, "stop")
    view = wait_for(lambda: (v := V.run_view(run_dir)).state != "running" and v, what="the stop")
    assert view.state == "stopped" and view.step < 200
    with safe_open(view.adapter_path, "pt") as f:  # a stopped run records the steps it trained, not the plan
        meta = f.metadata()
    assert (meta["ss_steps"], meta["ss_max_train_steps"]) == (str(view.step), "200")
    labels = [label for label, _ in G.adapter_choices(s)]
    assert f"{run_dir.name} (stopped at step {view.step})" in labels and not any("(final)" in x for x in labels)
    exported = G.export_run_adapter(run_dir, tmp_path / "exports")  # the Download button: kohya, fp16
    assert exported.name == "app-test-kohya-fp16.safetensors"
    with safe_open(str(exported), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
        assert any(k.endswith(".lora_down.weight") for k in f.keys())
    assert load_adapter(exported).layers.keys() == load_adapter(view.adapter_path).layers.keys()
    stopped_at = view.step
    assert tab.resume(s, run_dir.name) == run_dir
    wait_for(lambda: V.run_view(run_dir).step > stopped_at, what="the resumed run's next step")
    assert tab.initial_config(s).run.name == "app-test", "a refreshed page shows the running run's config"
    tab.command(s, None, "stop")  # with nothing followed, Stop reaches the active run
    wait_for(lambda: V.run_view(run_dir).state == "stopped", what="the second stop")
    assert active_run(s.runs_dir) is None
    starts = [e for e in read_events(run_dir / "events.jsonl") if isinstance(e, Started)]
    assert [e.start_step for e in starts] == [0, stopped_at]  # resumed from the stop, not from scratch
    log = V.read_log(run_dir)
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


def test_the_text_encoder_rows_follow_the_base_models_family(settings, tiny_sdxl_dir):
    sdxl = str(tiny_sdxl_dir)
    assert F.family_encoders(sdxl) == [("te1", "CLIP ViT-L"), ("te2", "OpenCLIP bigG")]
    assert F.family_encoders("") == [("te", "CLIP ViT-L")]
    rows = tab.encoder_rows(sdxl)  # te, te1, te2, te3: (row visibility, checkbox label) each
    assert [r["visible"] for r in rows[0::2]] == [False, True, True, False]
    assert rows[5]["label"] == "Train OpenCLIP bigG (te2)"
    assert "**SDXL**" in F.model_note(sdxl) and "te1" in F.model_note(sdxl)
    cfg = tab.initial_config(settings)
    cfg.model.path = sdxl
    F.apply_encoder_values(cfg, [True, 1e-4, True, 1e-5, False, 5e-6, True, 5e-6])  # hidden te, te3 rows ignored
    assert (cfg.network.text_encoders, cfg.optimizer.text_encoder_lr, cfg.optimizer.text_encoder_lrs) == (
        ["te1"], 1e-5, ["te2=5e-06"])
    F.apply_encoder_values(cfg, [False, 0, True, 1e-5, True, 2e-5, False, 5e-6])
    assert (cfg.network.text_encoders, cfg.optimizer.text_encoder_lrs) == (["all"], ["te2=2e-05"])
    back = F.encoder_values(cfg)
    assert back[2:6] == [True, 1e-5, True, 2e-5]


def test_the_gpu_choice_is_offered_only_with_more_than_one_gpu(settings, monkeypatch):
    """Issue 16: with two GPUs the Train tab offers them; picking sets distributed.processes and .gpus, the
    fields the CLI and the presets use (the picker keeps no setting of its own)."""
    monkeypatch.setattr(tab, "visible_gpus", lambda: ["NVIDIA RTX 4090 (24 GB)"])
    assert tab.gpu_picker(settings)["visible"] is False, "one GPU: nothing to choose"
    monkeypatch.setattr(tab, "visible_gpus", lambda: [])
    assert tab.gpu_picker(settings)["visible"] is False
    monkeypatch.setattr(tab, "visible_gpus", lambda: ["NVIDIA RTX 4090 (24 GB)", "NVIDIA RTX 3090 (24 GB)"])
    shown = tab.gpu_picker(settings)
    assert shown["visible"] is True and shown["value"] == [0], "the default config trains on the first GPU"
    assert shown["choices"] == [("0: NVIDIA RTX 4090 (24 GB)", 0), ("1: NVIDIA RTX 3090 (24 GB)", 1)]
    infos = [i.key for i in F.form_fields()]
    cfg = C.TrainConfig()
    for picked, processes, gpus in (([0, 1], 2, ""), ([1], 1, "1"), ([], 1, "")):
        values = dict(zip(tab.GPU_FIELDS, tab.on_gpus(picked)))
        assert values == {"distributed.processes": processes, "distributed.gpus": gpus}
        assert set(tab.GPU_FIELDS) <= set(infos)
        C.set_value(cfg, "distributed.processes", processes)
        C.set_value(cfg, "distributed.gpus", gpus)
        assert not [p for p in C.validate(cfg) if "distributed" in p], (picked, C.validate(cfg))
        assert tab.ticked_gpus(processes, gpus) == (picked or [0]), "the picker follows the fields back"
    assert tab.ticked_gpus(1, "0,x") == [], "a malformed field: nothing ticked (the form check names it)"
    assert tab.ticked_gpus(10 ** 9, "") == [0, 1], "a huge typed count costs nothing"


def test_a_config_that_names_a_missing_gpu_is_refused_before_a_run_exists(monkeypatch):
    import torch
    from trainer.job import machine_problems
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cfg = C.apply_overrides(C.TrainConfig(), ["distributed.processes=2", "distributed.gpus=1,2"])
    assert any("distributed.gpus names GPU 2, but this machine has 2 GPUs (0 to 1)" in p
               for p in machine_problems(cfg)), machine_problems(cfg)
    assert not machine_problems(C.apply_overrides(C.TrainConfig(), ["distributed.processes=2"]))


# ----------------------------------------------------------------------------------------------------------------
# issue 23: the Train tab's command buttons, as Gradio calls them

def wired(demo, elem_id: str, event: str = "click"):
    """The BlockFunction Gradio runs when the component with `elem_id` fires `event`."""
    ids = {b._id for b in demo.blocks.values() if getattr(b, "elem_id", None) == elem_id}
    found = [f for f in demo.fns.values() if any(t in ids and ev == event for t, ev in f.targets)]
    assert len(found) == 1, f"one {event} handler on #{elem_id}, found {len(found)}"
    return found[0]


def call_as_gradio(demo, block_fn, *args) -> list:
    """The handler's result after Gradio's postprocess, as the browser receives it (a Markdown given a list
    failed there: "'list' object has no attribute 'expandtabs'", a red Error pill)."""
    import asyncio
    return asyncio.run(demo.postprocess_data(block_fn, block_fn.fn(*args), None))


@pytest.mark.parametrize("elem_id,reply", [("stop-btn", "Stopping after the current step"),
                                           ("save-btn", "A checkpoint will be written"),
                                           ("sample-btn", "Samples will be rendered")])
def test_the_command_buttons_answer_in_the_status_line_with_and_without_a_run(settings, elem_id, reply):
    from app.main import build_app
    from trainer.events import CommandInbox
    from trainer.runlock import holding
    demo = build_app(settings)
    handler = wired(demo, elem_id)
    [idle] = call_as_gradio(demo, handler, None)
    assert idle == "⚠ No run is training now."
    run_dir, _ = fake_run(settings)
    with holding(run_dir):  # the run's lock held: it trains, as far as the app can tell
        [text] = call_as_gradio(demo, handler, None)
        assert text == f"**{run_dir.name}**: {tab.COMMAND_REPLIES[elem_id.split('-')[0]]}" and reply in text
    assert CommandInbox(run_dir).poll() == [elem_id.split("-")[0]], 'the run got the command'


def test_the_sample_line_says_when_the_first_samples_come_and_a_stop_lists_its_checkpoint_once(settings, tiny_model_dir,
                                                                                               image_dir):
    """Issue 23 item 6, on a real run folder: samples every 3 steps and a checkpoint every 2, stopped after step 2
    (its periodic checkpoint at step 2 and the stop's own are the same checkpoint)."""
    from test_training import make_cfg, train
    from trainer import runs
    from trainer.events import Progress
    from trainer.runlock import holding
    cfg = make_cfg(tiny_model_dir, image_dir, settings.runs_dir.parent, **{
        "schedule.max_steps": 8, "saving.every_n_steps": 2, "sampling.every_n_steps": 3})
    run_dir, seen = runs.create_run_dir(cfg), {}

    def at_step(trainer, event):
        if isinstance(event, Progress) and event.step == 1:
            seen["columns"] = tab.live(settings, run_dir.name)["columns"]
        if isinstance(event, Progress) and event.step == 2:
            trainer.inbox.request("stop")

    with holding(run_dir):  # as the app's child process holds it: the run trains
        train(cfg, run_dir, on_event=at_step)
    assert "Sample every n steps" not in seen["columns"], "samples are configured: they are not missing"
    assert "First samples at step 3" in seen["columns"], seen["columns"]
    stopped = tab.live(settings, run_dir.name)
    assert stopped["state"] == "stopped" and "Sample every n steps" not in stopped["columns"]
    assert "step 3" in stopped["columns"], stopped["columns"]
    assert stopped["status"].count("checkpoint at step 2") == 1, stopped["status"]
    from trainer import CheckpointWritten, read_events
    written = [e.step for e in read_events(run_dir / "events.jsonl") if isinstance(e, CheckpointWritten)]
    assert written == [2], f"the engine writes step 2's checkpoint once, not again for the stop: {written}"
    off = make_cfg(tiny_model_dir, image_dir, settings.runs_dir.parent, **{"run.name": "off",
                                                                           "sampling.every_n_steps": 0})
    off_dir = runs.create_run_dir(off)
    (off_dir / "events.jsonl").write_text("")
    assert "set **Sample every n steps**" in V.sample_prompts_text(V.run_view(off_dir)), "samples off: say how"


def test_the_validation_loss_is_labelled_as_what_it_measures(settings):
    """Issue 23 item 8: the held-out loss shares the plot with the training loss; its series name says what it is,
    and the plot's title names both."""
    frame = V.loss_frame([(1, 0.5), (2, 0.25)], [(0, 0.4), (2, 0.3)])
    assert set(frame["curve"]) == {"raw", "smoothed", V.VALIDATION_CURVE}
    assert "held-out" in V.VALIDATION_CURVE and "fixed noise" in V.VALIDATION_CURVE
    assert list(frame[frame["curve"] == V.VALIDATION_CURVE]["loss"]) == [0.4, 0.3]
    from app.main import build_app
    plot = next(b for b in build_app(settings).blocks.values() if getattr(b, "elem_id", None) == "loss-plot")
    assert "validation" in plot.title.lower() and plot.y_title, (plot.title, plot.y_title)


def test_a_preset_over_a_form_filled_from_a_running_run_keeps_only_what_the_user_chose(settings, tmp_path):
    """Issue 23 item 4: the form is pre-filled from a running run (its regularization folder and zqx prompts);
    the user picks their own dataset, then a preset. Their dataset is theirs; that run's folder and prompts are
    not, and are never called 'your' anything."""
    from app.main import build_app
    from trainer import load_preset
    from trainer.runlock import holding
    other = load_preset("tiny-demo")
    other.saving.runs_dir = str(settings.runs_dir)
    run_dir = settings.runs_dir / "tiny-demo-20260101-000000"
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text(C.dumps(other))
    mine = make_images(tmp_path / "mine")
    with holding(run_dir):  # that run trains while the page loads and while the preset is picked
        demo = build_app(settings)
        load = next(f for f in demo.fns.values() if any(ev == "load" for _, ev in f.targets)
                    and "field-dataset-path" in [getattr(o, "elem_id", None) for o in f.outputs])
        *shown_first, filled = load.fn()  # the page's load fills the form and records what it filled in
        assert filled == shown_first == tab.form_values(tab.initial_config(settings))
        assert str(other.dataset.regularization_path) in filled
        values = list(filled)
        values[[i.key for i in F.form_fields()].index("dataset.path")] = str(mine)  # the user's pick
        handler = wired(demo, "preset-picker", "change")
        out = call_as_gradio(demo, handler, "tiny-demo", filled, *values)
    shown = dict(zip([i.key for i in F.form_fields()], out))
    status = next(v for v in out if isinstance(v, str) and v.startswith("Preset **tiny-demo** applied."))
    assert shown["dataset.path"] == str(mine), status
    assert shown["dataset.regularization_path"] == "" and "zqx" not in shown["sampling.prompts"], status
    assert "your regularization folder" not in status and "your sample prompts" not in status, status
    assert "Kept your dataset." in status, status
    assert "regularization folder" in status, "what the form was filled with and is no longer there is said"


def test_compare_checkpoints_reports_k_of_n_and_lets_generate_in_between_rows(settings, tiny_model_dir, image_dir):
    """Issue 23 item 3: Compare checkpoints said nothing for minutes and Generate answered "device busy" until it
    ended. The compare reports checkpoint k of n; the device is held only while images render, so a generation
    asked for between two checkpoints runs (and the compare's grid is the same as without it); free afterwards."""
    from test_training import make_cfg, train
    from app import device
    from app import generation as G
    cfg = make_cfg(tiny_model_dir, image_dir, settings.runs_dir.parent, **{
        "schedule.max_steps": 4, "saving.every_n_steps": 1, "saving.keep_last": 4, "sampling.steps": 2,
        "sampling.prompts": ["zqx, a red square", "a blue square"]})
    _, _, run_dir = train(cfg)
    heard, generated = [], []

    def progress(share, text):
        heard.append((share, text))
        if text.startswith("checkpoint 3 of 4") and not generated:  # between rows: the Generate tab's request
            generated.append(G.generate(settings, str(tiny_model_dir), [], "a red square", steps=2, width=16,
                                        height=16))

    grid = G.compare_run(settings, run_dir, progress=progress)
    assert generated and len(generated[0]) == 1, "a generation got the device while the compare ran"
    for k in range(1, 5):
        assert any(text.startswith(f"checkpoint {k} of 4 (step-00000{k})") for _, text in heard), (k, heard)
    shares = [share for share, _ in heard if share is not None]
    assert shares == sorted(shares) and shares[-1] == 1.0
    assert not device.device_busy(), "the device is free after the compare"
    again = G.compare_run(settings, run_dir)
    assert list(again.getdata()) == list(grid.getdata()), "the generation between rows changed nothing in the grid"
    assert grid.size[1] > 4 * 16 and grid.size[0] > 4 * 16  # 4 rows, 2 prompts x 2 seeds


def test_a_generate_pressed_while_a_compare_renders_waits_its_turn(settings, tiny_model_dir, image_dir):
    """Issue 23 item 3 (the review's case): Generate pressed in another tab while a compare's stretch holds the
    device waited 1 s and answered "device busy". It waits for the stretch, runs before the next one (the lock is
    fair), and the compare goes on. The stretch is made long by its own progress callback, not timed."""
    import threading
    import time as _time
    from test_training import make_cfg, train
    from app import generation as G
    cfg = make_cfg(tiny_model_dir, image_dir, settings.runs_dir.parent, **{
        "schedule.max_steps": 2, "saving.every_n_steps": 1, "sampling.steps": 2, "sampling.prompts": ["zqx"]})
    _, _, run_dir = train(cfg)
    results, threads = [], []

    def pressed():
        try:
            results.append(G.generate(settings, str(tiny_model_dir), [], "a red square", steps=2, width=16,
                                      height=16))
        except Exception as e:  # the answer the user saw
            results.append(e)

    def progress(share, text):
        if ": " in text and not threads:  # a denoising step of the first stretch: the device is held
            threads.append(threading.Thread(target=pressed))
            threads[0].start()
            _time.sleep(2.5)  # the stretch goes on longer than the old 1 s wait (CPU renders take far longer)

    G.compare_run(settings, run_dir, progress=progress)
    threads[0].join(600)
    assert len(results) == 1 and isinstance(results[0], list), results


def test_a_compare_and_a_generate_on_another_model_keep_one_model_in_memory(settings, tiny_model_dir, image_dir):
    """The review's case: a Generate on another base model between two stretches of a compare replaced the app's
    cached model, while the compare went on with its own reference: two base models in (GPU) memory. Each stretch
    now takes the cached Generator of its run's model under the device lock."""
    import gc
    from test_training import make_cfg, train
    from app import generation as G
    from trainer import Generator
    cfg = make_cfg(tiny_model_dir, image_dir, settings.runs_dir.parent, **{
        "schedule.max_steps": 2, "saving.every_n_steps": 1, "sampling.steps": 2, "sampling.prompts": ["zqx"]})
    _, _, run_dir = train(cfg)
    loaded_counts = []

    def progress(share, text):
        if text.startswith("checkpoint 2 of 2") and ": " not in text:  # between the two checkpoints' stretches
            G.generate(settings, "", [], "a red square", steps=1, width=16, height=16)  # the built-in model
        elif text.startswith("checkpoint 2 of 2") and not loaded_counts:  # the second stretch renders
            gc.collect()
            loaded_counts.append(sum(1 for o in gc.get_objects() if isinstance(o, Generator) and o.loaded))

    G.compare_run(settings, run_dir, progress=progress)
    assert loaded_counts == [1], f"base models in memory while the compare rendered again: {loaded_counts}"
