"""Train tab: a form generated from trainer.fields(), Start/Stop, and a live view read from the run folder.

The path of a run: Start -> `forms.values_to_config` -> `trainer.start_run` (the complete check, the run folder,
the child process) -> the live view reads `events.jsonl` through `runview`.
"""
from __future__ import annotations

import time
from pathlib import Path

import gradio as gr

from trainer import (SECTIONS, TEXT_ENCODER_NAMES, FieldInfo, active_run, apply_preset, checkpoint_dirs,
                     chosen_gpus, dataset_trigger, default_config, fields, get_value, gpu_settings, list_presets,
                     list_queue, list_runs, load_run_config, queue_train, resume_run, run_info, runner_active,
                     send_command, start_run, training_defaults, visible_gpus)

from .. import datasets as D
from .. import forms as F
from .. import runview as V
from ..device import free_device, hold_device, release_models
from ..errors import AppError, guarded
from ..generation import compare_run, export_run_adapter
from ..settings import AppSettings

HELP = ("Pick a preset and a dataset, check the basic settings and press **Start**. The training runs in its own "
        "process: you can close the browser, and every run below survives an app restart. **Alpha**: the update "
        "is scaled by alpha/rank, so alpha = rank means scale 1 and a lower alpha needs a higher learning rate.")
SECTION_TITLES = {"run": "Run", "model": "Base model", "dataset": "Dataset and buckets", "network": "LoRA network",
                  "optimizer": "Optimizer", "schedule": "Schedule", "loss": "Loss", "precision": "Precision and memory",
                  "sampling": "Samples during training", "validation": "Validation and the best checkpoint",
                  "saving": "Saving and checkpoints", "logging": "Logging",
                  "distributed": "Several GPUs or machines"}
SECTION_WORDS = {"run": "Run", "model": "Model", "dataset": "Dataset", "network": "LoRA", "optimizer": "Optimizer",
                 "schedule": "Schedule", "loss": "Loss", "precision": "Precision", "sampling": "Sample",
                 "validation": "Validation", "saving": "Checkpoint", "logging": "Logging",
                 "distributed": "Distributed"}
FIELDS_PER_ROW = 2
VIEW_KEYS = ("progress", "status", "losses", "samples", "columns", "failure")
PLOT_EVERY_S = 5
LIVE_EVERY_S = 2.0  # the live view while a run trains: every redraw of the big Train tab costs the browser CPU
COMMAND_REPLIES = {"stop": "Stopping after the current step; the adapter so far will be saved.",
                   "save": "A checkpoint will be written after the current step.",
                   "sample": "Samples will be rendered after the current step."}
WHICH = {"final": None, "best checkpoint": "best"}  # the download choice -> export_run_adapter's step
GPU_FIELDS = ("distributed.processes", "distributed.gpus")  # what the GPU picker sets


# ----------------------------------------------------------------------------------------------------------------
# handlers: plain values in, plain values out

def initial_config(settings: AppSettings):
    """What the form shows on a fresh page: the running run's config while one trains, else the defaults that
    follow the base model (its native size, a short run on the tiny model)."""
    busy = active_run(settings.runs_dir)
    if busy is not None:
        return load_run_config(busy.run_dir)
    return default_config(settings.base_model, str(settings.runs_dir))


def to_config(settings: AppSettings, values: list):
    """(config, problems by field) from the form's values: its fields, then the text-encoder rows."""
    n = len(F.form_fields())
    return F.values_to_config(values[:n], str(settings.runs_dir), list(values[n:]) or None, settings)


def form_values(cfg) -> list:
    """What the form's widgets show for cfg: its fields, then the text-encoder rows."""
    return F.config_to_values(cfg) + F.encoder_values(cfg)


def preset_form(settings: AppSettings, name: str, filled: list | None, values: list) -> tuple[list, str, list]:
    """The form after picking a preset: its values, the status line, and the new record of what the page filled
    in. Only what differs from what the page filled in (a running run's config, the defaults, an earlier preset)
    is the user's: the engine's apply_preset keeps that, and nothing else is called theirs."""
    current, _ = to_config(settings, values)
    before = to_config(settings, filled)[0] if filled else None
    cfg, notes = apply_preset(current, name, filled=before)
    # what the page fills in now: the preset over what it had filled in (the user's own choices stay theirs)
    refilled = apply_preset(before, name, filled=before)[0] if before is not None else None
    if cfg.dataset.trigger and cfg.dataset.trigger != dataset_trigger(cfg.dataset.path or "."):
        notes.append(f"Its trigger '{cfg.dataset.trigger}' lives with a dataset: set it in the Dataset tab.")
    return (form_values(cfg), " ".join([f"Preset **{name}** applied.", *notes]),
            form_values(refilled) if refilled is not None else None)


def check_form(settings: AppSettings, values: list) -> tuple[dict[str, str], str]:
    """Problems by field key, and a one-line summary for the Start button's status."""
    _, errors = to_config(settings, values)
    if not errors:
        return {}, "Ready to start."
    general = f" {errors['']}" if "" in errors else ""  # a problem no single field owns
    return errors, f"{len(errors)} setting(s) need a fix before starting (marked in the form).{general}"


def start(settings: AppSettings, values: list) -> tuple[Path, str]:
    """Start a run from the form: the same complete check as the CLI, before any run folder exists."""
    cfg, errors = to_config(settings, values)
    if errors:
        raise AppError("Not started: " + "; ".join(errors.values()))
    if not hold_device():
        raise AppError("Images are being generated; press Start again when they are done (one device, one job).")
    try:
        job = start_run(cfg)
        release_models()  # the training gets the device memory the Generate tab held
    finally:
        free_device()
    return job.run_dir, f"Started **{job.run_dir.name}**."


def add_to_queue(settings: AppSettings, values: list) -> str:
    """Queue the form's config as Start would train it: the same config (to_config) and the same complete check
    (queue_train checks it as start_run does), so a typo fails now, not when its turn comes."""
    cfg, errors = to_config(settings, values)
    if errors:
        raise AppError("Not queued: " + "; ".join(errors.values()))
    job = queue_train(cfg, runs_dir=settings.runs_dir)
    jobs, _ = list_queue(settings.runs_dir)
    waiting = [j.id for j in jobs if j.state == "queued"]
    place = f"number {waiting.index(job.id) + 1} of {len(waiting)} waiting" if job.id in waiting else "queued"
    then = "the queue is running" if runner_active(settings.runs_dir) else "start the queue in the **Queue** tab"
    return f"Queued **{job.name}** as job {job.id} ({place}); {then}."


def resume(settings: AppSettings, name: str | None) -> Path:
    if not name:
        raise AppError("Pick a run to resume first.")
    if not hold_device():
        raise AppError("Images are being generated; press Resume again when they are done (one device, one job).")
    try:
        job = resume_run(Path(settings.runs_dir) / name)
        release_models()
        return job.run_dir
    finally:
        free_device()


def command(settings: AppSettings, followed: str | None, name: str) -> str:
    """stop / save / sample through the run folder, so a run started before an app restart obeys too."""
    run_dir = Path(settings.runs_dir) / followed if followed else None
    if run_dir is None or V.run_view(run_dir).state != "running":
        busy = active_run(settings.runs_dir)
        run_dir = busy.run_dir if busy else None
    if run_dir is None:
        raise AppError("No run is training now.")
    send_command(run_dir, name)
    return f"**{run_dir.name}**: {COMMAND_REPLIES[name]}"


def followed_dir(settings: AppSettings, followed: str | None, pinned: bool = False) -> Path | None:
    """The run the live view shows: the one the user follows, else the active one, else the newest. A followed
    run that no longer trains gives way to one that does (the queue's next job, a run started elsewhere), unless
    the user picked it with Follow (`pinned`)."""
    busy = active_run(settings.runs_dir)
    if followed and (Path(settings.runs_dir) / followed).is_dir():
        chosen = Path(settings.runs_dir) / followed
        if pinned or busy is None or busy.run_dir.resolve() == chosen.resolve() or \
                run_info(chosen).state == "running":  # several lanes of the queue: more than one trains
            return chosen
    if busy is not None:
        return busy.run_dir
    found = list_runs(settings.runs_dir)
    return found[0].run_dir if found else None


def live(settings: AppSettings, followed: str | None, pinned: bool = False) -> dict:
    """Everything the live view shows, keyed as VIEW_KEYS."""
    run_dir = followed_dir(settings, followed, pinned)
    if run_dir is None:
        return {"run": "", "progress": V.progress_html(None), "status": "No runs yet: press Start.",
                "losses": [], "validations": [], "samples": [], "columns": "", "failure": "", "state": ""}
    view = V.run_view(run_dir)
    busy = active_run(settings.runs_dir)
    if busy is not None and busy.run_dir.resolve() == run_dir.resolve():
        view.state, view.error = "running", ""  # its process lives (it may still be loading the model)
    return {"run": run_dir.name, "progress": V.progress_html(view), "status": V.status_text(view),
            "losses": view.losses, "validations": view.validations, "samples": view.samples,
            "columns": V.sample_prompts_text(view),
            "failure": V.failure_text(view), "state": view.state, "view": view}


def changed(view: dict, sent: dict, now: float | None = None) -> tuple[list, dict]:
    """The live view's outputs with gr.skip() for each one the browser already shows; and the new record of what
    it shows. Plots and images are compared by what they are made of (the points, the sample sets); while a run
    trains, the loss plot (the costliest widget to redraw) is sent at most every PLOT_EVERY_S seconds."""
    losses = (view["run"], len(view["losses"]), view["losses"][-1:], len(view["validations"]))
    if view["state"] == "running":
        losses = (view["run"], int((time.monotonic() if now is None else now) // PLOT_EVERY_S))
    stamps = {"progress": view["progress"], "status": view["status"], "failure": view["failure"], "losses": losses,
              "samples": (view["run"], [(s.step, s.paths) for s in view["samples"]]), "columns": view["columns"]}
    out = []
    for key in VIEW_KEYS:
        if sent.get(key) == stamps[key]:
            out.append(gr.skip())
        elif key == "losses":
            out.append(V.loss_frame(view["losses"], view["validations"]))
        elif key == "samples":
            out.append(V.sample_grid(view["view"]) if view.get("view") else None)
        else:
            out.append(view[key])
    return out, stamps


def network_visibility(settings: AppSettings, values: list) -> list[bool]:
    """Whether each of forms.switched_fields() shows for the network the form describes (its type, DoRA, targets):
    the fields that apply to it, and any with a problem (forms.network_fields_shown)."""
    cfg, errors = to_config(settings, values)
    shown = F.network_fields_shown(cfg, errors)
    return [shown[key] for key in F.switched_fields()]


def compared_text(name: str, seconds: float) -> str:
    return f"Compared the checkpoints of **{name}** in {seconds:.0f} s (rows: checkpoints, oldest first)."


def gpu_picker(settings: AppSettings) -> dict:
    """The GPU picker for this machine, after the page loaded (counting GPUs loads torch): shown only with more
    than one GPU, ticked as the form's config trains."""
    gpus = visible_gpus()
    if len(gpus) < 2:
        return {"visible": False}
    d = initial_config(settings).distributed
    return {"visible": True, "choices": [(f"{i}: {name}", i) for i, name in enumerate(gpus)],
            "value": ticked_gpus(d.processes, d.gpus)}


def ticked_gpus(processes, gpus) -> list[int]:
    """The picker's ticks for the form's distributed fields (a preset, a resumed run's config, a typed value)."""
    count = len(visible_gpus())
    return [i for i in chosen_gpus(min(int(processes or 1), count), gpus or "") if i < count]


def on_gpus(picked: list[int]) -> list:
    """The form's GPU_FIELDS for the GPUs picked (one training process each)."""
    values = gpu_settings(list(picked or []))
    return [values[key] for key in GPU_FIELDS]


def runs_rows(settings: AppSettings) -> list[list]:
    """Rows for the runs list: name, state, step/total, started, adapter."""
    rows = []
    for info in list_runs(settings.runs_dir):
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(info.started_at))
        rows.append([info.run_dir.name, info.state, f"{info.step}/{info.total_steps}", started,
                     "yes" if info.adapter_path and Path(info.adapter_path).exists() else ""])
    return rows


def run_names(settings: AppSettings) -> list[str]:
    return [row[0] for row in runs_rows(settings)]


def model_defaults(new: str, before: str, current: dict) -> dict:
    """The form values a new base model brings: each setting that follows the model (the engine's
    training_defaults of either model: its native size, its family's sample steps and guidance, the tiny model's
    short run) and that the form still shows as the old model set it; what the user changed stays theirs."""
    old_cfg, new_cfg = default_config(before or ""), default_config(new or "")
    keys = sorted(set(training_defaults(new or "")) | set(training_defaults(before or "")))
    return {key: get_value(new_cfg, key) for key in keys
            if key in current and current[key] == get_value(old_cfg, key) != get_value(new_cfg, key)}


def export_formats(settings: AppSettings, name: str | None) -> dict:
    """The download's layout choices for a run (its base model's family's), labelled by the programs that read
    each, the one that loads in the most programs picked."""
    run_dir = Path(settings.runs_dir) / name if name else None
    choices = F.format_choices(str(run_dir) if run_dir is not None and run_dir.is_dir() else settings.base_model)
    return {"choices": choices, "value": choices[0][1]}


def encoder_rows(path: str) -> list:
    """Updates for the text-encoder rows: the base model's encoders shown, with their names; the others hidden."""
    mine = dict(F.family_encoders(path))
    out = []
    for name in TEXT_ENCODER_NAMES:
        label = f"Train {mine[name]} ({name})" if name in mine else name
        out += [gr.update(visible=name in mine), gr.update(label=label)]
    return out


def trigger_note(path: str) -> str:
    """The dataset's trigger, shown beside the dataset picker (it is set in the Dataset tab, its one place)."""
    if not path or not Path(path).is_dir():
        return ""
    trigger = dataset_trigger(path)
    return (f"Trigger: **{trigger}** (from the dataset; change it in the Dataset tab)." if trigger
            else "No trigger word: captions train as they are (set one in the Dataset tab).")


# ----------------------------------------------------------------------------------------------------------------
# layout

def display_label(info: FieldInfo) -> str:
    """The field's label, with its section in front where another section has the same one ("Name" twice)."""
    same = [i for i in fields() if i.label == info.label]
    return f"{SECTION_WORDS.get(info.section, info.section)} {info.label.lower()}" if len(same) > 1 else info.label


def bounds_text(info: FieldInfo) -> str:
    if info.min is not None and info.max is not None:
        return f" ({info.min:g} to {info.max:g})"
    if info.min is not None and info.min != 0:
        return f" (at least {info.min:g})"
    return ""


def component_for(info: FieldInfo, value):
    """The widget of one config field: choices -> Dropdown, bool -> Checkbox, numbers -> Number, list -> Textbox."""
    common = {"label": display_label(info), "info": info.help, "elem_id": "field-" + info.key.replace(".", "-")}
    if info.choices:
        return gr.Dropdown(info.choices, value=value, **common)
    if info.type is bool:
        return gr.Checkbox(value=value, **common)
    if info.type in (int, float):
        # bounds go in the text, not the widget: Gradio would reject an out-of-range value with a toast, while
        # the form check names the problem next to the field
        common["info"] += bounds_text(info)
        return gr.Number(value=value, precision=0 if info.type is int else None, **common)
    if info.type is list:
        common["info"] += " One per line."
        return gr.Textbox(value=value, lines=2, max_lines=8, **common)
    return gr.Textbox(value=value, **common)


def _field_grid(infos: list[FieldInfo], values: dict) -> tuple[list, list]:
    comps, errs = [], []
    for i in range(0, len(infos), FIELDS_PER_ROW):
        with gr.Row(equal_height=False):
            for info in infos[i:i + FIELDS_PER_ROW]:
                with gr.Column(min_width=220):
                    comps.append(component_for(info, values[info.key]))
                    errs.append(gr.Markdown(visible=False, elem_classes=["ld-field-error"],
                                            elem_id="error-" + info.key.replace(".", "-")))
    return comps, errs


def _form(infos: list[FieldInfo], values: dict, after_basic=None) -> tuple[list, list, dict]:
    """Basic fields in view (then `after_basic()`), the rest in one collapsed group per section; returns widgets
    in form order."""
    comps_by_key, errs_by_key = {}, {}
    groups = [("", [i for i in infos if i.basic])]
    groups += [(s, [i for i in infos if i.section == s and not i.basic]) for s in SECTIONS]
    for section, members in groups:
        if not members:
            continue
        if section:
            with gr.Accordion(f"More: {SECTION_TITLES.get(section, section)}", open=False):
                comps, errs = _field_grid(members, values)
        else:
            comps, errs = _field_grid(members, values)
            if after_basic:
                after_basic()
        comps_by_key.update(zip([i.key for i in members], comps))
        errs_by_key.update(zip([i.key for i in members], errs))
    return [comps_by_key[i.key] for i in infos], [errs_by_key[i.key] for i in infos], comps_by_key


def _encoder_rows(cfg, c: dict) -> None:
    """One row per text encoder the base model's family has: a switch and a learning rate (kohya's SDXL trainer
    sets each of its two apart); rows of other families are built hidden."""
    gr.Markdown("**Text encoders** (each its own LoRA and learning rate; none ticked = the UNet or transformer only)",
                elem_classes=["ld-note"])
    values, mine = F.encoder_values(cfg), dict(F.family_encoders(cfg.model.path))
    c["encoders"], c["encoder_rows"] = [], []
    for i, name in enumerate(TEXT_ENCODER_NAMES):
        with gr.Row(visible=name in mine, elem_id=f"encoder-{name}") as row:
            on = gr.Checkbox(values[2 * i], label=f"Train {mine.get(name, name)} ({name})", elem_id=f"te-{name}-on")
            lr = gr.Number(values[2 * i + 1], label="Learning rate", elem_id=f"te-{name}-lr")
        c["encoders"] += [on, lr]
        c["encoder_rows"] += [row, on]


def _left_column(settings: AppSettings, c: dict) -> None:
    infos, cfg = F.form_fields(), initial_config(settings)
    values = dict(zip([i.key for i in infos], F.config_to_values(cfg)))
    with gr.Row():
        c["preset"] = gr.Dropdown([p.stem for p in list_presets()], value=None, label="Preset",
                                  elem_id="preset-picker",
                                  info="Tested training settings (files in presets/). Your dataset is kept.")
        c["dataset"] = gr.Dropdown(D.list_datasets(settings.data_dir), value=None, label="Dataset",
                                   elem_id="train-dataset", info="A dataset from the Dataset tab.")
    c["trigger"] = gr.Markdown(trigger_note(values["dataset.path"]), elem_id="train-trigger")
    c["gpus"] = gr.CheckboxGroup([], label="GPUs", visible=False, elem_id="train-gpus",
                                 info="Train on these together, one process each (data parallel); the run view "
                                      "shows the images per step. More in Several GPUs or machines.")
    c["model_note"] = gr.Markdown(F.model_note(values["model.path"]), elem_id="train-model-note")
    c["form"], c["form_errs"], c["by_key"] = _form(infos, values, lambda: _encoder_rows(cfg, c))
    c["inputs"] = c["form"] + c["encoders"]


def _live_column(c: dict) -> None:
    with gr.Row():
        c["start_btn"] = gr.Button("Start training", variant="primary", elem_id="start-btn", scale=2)
        c["stop_btn"] = gr.Button("Stop", variant="stop", elem_id="stop-btn", scale=1)
        c["queue_btn"] = gr.Button("Add to queue", elem_id="queue-add-btn", scale=1)
    c["form_status"] = gr.Markdown(elem_id="form-status")
    c["progress"] = gr.HTML(V.progress_html(None), elem_id="train-progress")
    c["status"] = gr.Markdown(elem_id="train-status")
    c["failure"] = gr.Markdown(elem_id="train-failure", elem_classes=["ld-failure"])
    c["loss_plot"] = gr.LinePlot(V.loss_frame([]), x="step", y="loss", color="curve", height=220,
                                 title="Training loss, and the validation loss when the run has one",
                                 y_title="loss (diffusion MSE)", elem_id="loss-plot")
    c["samples"] = gr.Image(label="Samples by step (rows: steps, columns: prompts)", interactive=False,
                            format="png", elem_id="train-samples", height=300)
    c["columns"] = gr.Markdown(elem_id="sample-prompts", elem_classes=["ld-note"])
    with gr.Row():
        c["save_btn"] = gr.Button("Save checkpoint now", size="sm", elem_id="save-btn")
        c["sample_btn"] = gr.Button("Render samples now", size="sm", elem_id="sample-btn")
    with gr.Accordion("Training log", open=False) as c["log_box"]:
        c["log"] = gr.Textbox(lines=14, max_lines=30, show_label=False, elem_id="train-log")
        c["log_btn"] = gr.Button("Reload log", size="sm")


def _runs_column(settings: AppSettings, c: dict) -> None:
    gr.Markdown("### Runs\nStopped or crashed runs can be resumed from their last checkpoint.")
    c["runs"] = gr.Dataframe(runs_rows(settings), headers=["run", "state", "step", "started", "adapter"],
                             interactive=False, elem_id="runs-table", max_height=220)
    c["picked"] = gr.Dropdown(run_names(settings), value=None, label="Run", elem_id="run-picker",
                              info="Follow it in the live view, resume it, or download its adapter.")
    formats = export_formats(settings, None)
    with gr.Row():
        c["fmt"] = gr.Dropdown(formats["choices"], value=formats["value"], label="Format", elem_id="run-format",
                               info="Each layout with the programs that load it; the first loads in the most.")
        c["dtype"] = gr.Dropdown(["fp16", "fp32", "bf16"], value="fp16", label="Precision")
    c["which"] = gr.Radio(list(WHICH), value="final", label="Adapter to download", elem_id="run-which",
                          info="best checkpoint: the one with the lowest validation loss (runs with validation).")
    with gr.Row():
        c["follow_btn"] = gr.Button("Follow", size="sm")
        c["resume_btn"] = gr.Button("Resume", size="sm", elem_id="resume-btn")
        c["export_btn"] = gr.Button("Download adapter", size="sm", elem_id="export-btn")
        c["compare_btn"] = gr.Button("Compare checkpoints", size="sm", elem_id="compare-btn")
    c["download"] = gr.File(label="Adapter file", interactive=False, elem_id="run-download", visible=False)
    c["compare"] = gr.Image(label="Checkpoints compared (rows: checkpoints, with validation loss; columns: prompts "
                                  "x seeds)", interactive=False, format="png", elem_id="compare-grid", visible=False)
    c["compare_status"] = gr.Markdown(elem_id="compare-status")


def build(settings: AppSettings, demo: gr.Blocks, dataset_picker: gr.Dropdown, bucket_resolution: gr.Number) -> None:
    c: dict = {"dataset_picker": dataset_picker, "bucket_resolution": bucket_resolution}
    gr.Markdown(HELP)
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            _left_column(settings, c)
        with gr.Column(scale=2):
            _live_column(c)
            _runs_column(settings, c)
    c["followed"] = gr.State(None)
    c["sent"] = gr.State({})
    c["timer"] = gr.Timer(LIVE_EVERY_S)
    c["slow_timer"] = gr.Timer(5.0)
    c["model_before"] = gr.State(settings.base_model)
    c["filled"] = gr.State(None)  # the form's values as the page filled them in: what the user did not choose
    _wire_form(settings, demo, c)
    _wire_live(settings, demo, c)
    _wire_runs(settings, demo, c)


# ----------------------------------------------------------------------------------------------------------------
# wiring

def _wire_form(settings: AppSettings, demo: gr.Blocks, c: dict) -> None:
    s, inputs, by_key = settings, c["inputs"], c["by_key"]
    infos = F.form_fields()

    def on_check(*vals):
        errors, summary = check_form(s, list(vals))
        updates = [gr.update(visible=i.key in errors, value=f"⚠ {errors.get(i.key, '')}") for i in infos]
        return (*updates, summary)

    gr.on([x.change for x in inputs], guarded(on_check, c["form_errs"] + [c["form_status"]], c["form_status"]),
          inputs, c["form_errs"] + [c["form_status"]], show_progress="hidden", trigger_mode="always_last")

    def on_preset(name, filled, *vals):
        if not name:
            return [gr.skip() for _ in inputs] + [gr.skip(), gr.skip()]
        values, status, refilled = preset_form(s, name, filled, list(vals))
        return values + [status, refilled]

    preset_outputs = inputs + [c["form_status"], c["filled"]]
    c["preset"].change(guarded(on_preset, preset_outputs, c["form_status"]), [c["preset"], c["filled"], *inputs],
                       preset_outputs)
    path_box = by_key["dataset.path"]

    def on_dataset(name):
        path = str(D.dataset_dir(s.data_dir, name))  # as the app names it; the run records it absolute
        return path, trigger_note(path)

    c["dataset"].change(guarded(on_dataset, [path_box, c["trigger"]], c["trigger"]), [c["dataset"]],
                        [path_box, c["trigger"]])
    path_box.blur(trigger_note, [path_box], [c["trigger"]], show_progress="hidden")
    _wire_model_defaults(c)
    _wire_network(s, demo, c)
    by_key["dataset.resolution"].change(lambda r: r if r else gr.skip(), [by_key["dataset.resolution"]],
                                        [c["bucket_resolution"]], show_progress="hidden")
    c["dataset_picker"].change(lambda name: gr.update(choices=D.list_datasets(s.data_dir)), [c["dataset_picker"]],
                               [c["dataset"]])
    demo.load(lambda: (*(values := form_values(initial_config(s))), values), None, inputs + [c["filled"]])
    demo.load(lambda: gr.update(**gpu_picker(s)), None, [c["gpus"]], show_progress="hidden")
    fields = [by_key[key] for key in GPU_FIELDS]
    c["gpus"].input(on_gpus, [c["gpus"]], fields, show_progress="hidden")

    def follow(processes, gpus):
        return gr.update(value=ticked_gpus(processes, gpus)) if len(visible_gpus()) > 1 else gr.skip()
    gr.on([f.change for f in fields], follow, fields, [c["gpus"]], show_progress="hidden")
    demo.load(lambda: gr.update(choices=D.list_datasets(s.data_dir)), None, [c["dataset"]])


def _wire_network(settings: AppSettings, demo: gr.Blocks, c: dict) -> None:
    """The fields that apply to the form's network show: when the page loads (not while it is built: the
    complete check loads torch) and when its type, DoRA or targets change (by hand, a preset, a loaded run)."""
    switched = [c["by_key"][key] for key in F.switched_fields()]

    def on_network(*vals):
        return [gr.update(visible=shown) for shown in network_visibility(settings, list(vals))]

    gr.on([demo.load] + [c["by_key"][key].change for key in F.NETWORK_SWITCHES], guarded(on_network, switched),
          c["inputs"], switched, show_progress="hidden", trigger_mode="always_last")


def _wire_model_defaults(c: dict) -> None:
    """A new base model brings the settings that follow it (model_defaults: its native size, its family's sample
    steps and guidance, unless the user had changed them), its family's note and one text-encoder row per encoder
    it has."""
    model = c["by_key"]["model.path"]
    keys = [i.key for i in F.form_fields() if i.key != "model.path"]
    follow = [c["by_key"][key] for key in keys]
    outputs = [c["model_before"], c["model_note"], *c["encoder_rows"], *follow]

    def on_model(new, before, *values):
        if new == before:
            return [gr.skip() for _ in outputs]
        brought = model_defaults(new, before, dict(zip(keys, values)))
        return [new, F.model_note(new), *encoder_rows(new), *(brought.get(key, gr.skip()) for key in keys)]

    for event in (model.blur, model.submit, model.change):
        event(on_model, [model, c["model_before"], *follow], outputs, show_progress="hidden",
              trigger_mode="always_last")


def _wire_live(settings: AppSettings, demo: gr.Blocks, c: dict) -> None:
    s = settings
    outputs = [c["progress"], c["status"], c["loss_plot"], c["samples"], c["columns"], c["failure"]]
    view_outputs = outputs + [c["sent"], c["timer"]]

    def render(followed, sent):
        """The live view; its timer stops once the shown run is not training (the slow timer starts it
        again when a run begins), so an idle page pays only for the 5-second runs refresh."""
        view = live(s, followed, _pinned(followed, sent))
        values, stamps = changed(view, sent or {})
        ticking = view["state"] == "running"
        # stopping is always sent (a tick may come from a timer another handler woke); starting only once
        timer = gr.Timer(active=False) if not ticking else gr.skip() if (sent or {}).get("ticking") else \
            gr.Timer(active=True)
        return (*values, {**stamps, "ticking": ticking, "pinned": (sent or {}).get("pinned")}, timer)

    def on_start(*vals):
        run_dir, text = start(s, list(vals))
        return run_dir.name, text, runs_rows(s), gr.update(choices=run_names(s))

    start_outputs = [c["followed"], c["form_status"], c["runs"], c["picked"]]
    c["start_btn"].click(guarded(on_start, start_outputs, c["form_status"]), c["inputs"], start_outputs,
                         concurrency_limit=1).then(render, [c["followed"], c["sent"]], view_outputs)
    c["queue_btn"].click(guarded(lambda *vals: add_to_queue(s, list(vals)), c["form_status"], c["form_status"]),
                         c["inputs"], c["form_status"], concurrency_limit=1)
    for btn, name in ((c["stop_btn"], "stop"), (c["save_btn"], "save"), (c["sample_btn"], "sample")):
        btn.click(guarded(_command_handler(s, name), [c["form_status"]], c["form_status"]), [c["followed"]],
                  [c["form_status"]])
    c["timer"].tick(render, [c["followed"], c["sent"]], view_outputs, show_progress="hidden")
    # a run picked with Follow stays in view; one followed because it trained gives way to the next that trains
    c["follow_btn"].click(lambda name: (name, {"pinned": name}), [c["picked"]], [c["followed"], c["sent"]]).then(
        render, [c["followed"], c["sent"]], view_outputs)
    demo.load(lambda: (_active_name(s), {}), None, [c["followed"], c["sent"]]).then(
        render, [c["followed"], c["sent"]], view_outputs)
    log_source = [c["followed"], c["sent"]]
    c["log_btn"].click(lambda f, sent: V.read_log(followed_dir(s, f, _pinned(f, sent))), log_source, [c["log"]])
    c["log_box"].expand(lambda f, sent: V.read_log(followed_dir(s, f, _pinned(f, sent))), log_source, [c["log"]])


def _pinned(followed: str | None, sent: dict | None) -> bool:
    return bool(followed) and (sent or {}).get("pinned") == followed


def _command_handler(settings: AppSettings, name: str):
    def handler(followed):
        return command(settings, followed, name)  # one output: Gradio takes the value itself, not a list of one
    return handler


def _active_name(settings: AppSettings) -> str | None:
    busy = active_run(settings.runs_dir)
    return busy.run_dir.name if busy else None


def _wire_runs(settings: AppSettings, demo: gr.Blocks, c: dict) -> None:
    s = settings

    def refresh_runs(current):
        names = run_names(s)
        return runs_rows(s), gr.update(choices=names, value=current if current in names else None)

    def refresh_run_choices(shown):
        # choices only: a tick that wrote the picked value back could undo a pick made while it was in flight;
        # and nothing at all when nothing changed. A run that started (here, in another tab or from the CLI)
        # wakes the live view's timer.
        rows = runs_rows(s)
        wake = gr.Timer(active=True) if active_run(s.runs_dir) is not None else gr.skip()
        if rows == shown:
            return gr.skip(), gr.skip(), shown, wake
        return rows, gr.update(choices=[r[0] for r in rows]), rows, wake

    shown = gr.State(runs_rows(s))
    c["slow_timer"].tick(refresh_run_choices, [shown], [c["runs"], c["picked"], shown, c["timer"]],
                         show_progress="hidden")
    demo.load(refresh_runs, [c["picked"]], [c["runs"], c["picked"]])

    def on_resume(name):
        run_dir = resume(s, name)
        gr.Info(f"Resuming {run_dir.name} from its last checkpoint.")
        return run_dir.name, {}, *refresh_runs(name), gr.Timer(active=True)

    resume_outputs = [c["followed"], c["sent"], c["runs"], c["picked"], c["timer"]]
    c["resume_btn"].click(guarded(on_resume, resume_outputs), [c["picked"]], resume_outputs, concurrency_limit=1)

    def on_export(name, format, precision, which):
        if not name:
            raise AppError("Pick a run first.")
        path = export_run_adapter(Path(s.runs_dir) / name, Path(s.adapters_dir) / "exports", format, precision,
                                  step=WHICH.get(which))
        return gr.update(value=str(path), visible=True)

    c["export_btn"].click(guarded(on_export, c["download"]), [c["picked"], c["fmt"], c["dtype"], c["which"]],
                          c["download"])
    c["picked"].change(lambda name: gr.update(**export_formats(s, name)), [c["picked"]], [c["fmt"]],
                       show_progress="hidden")
    _wire_compare(s, c)


def _wire_compare(settings: AppSettings, c: dict) -> None:
    """Compare checkpoints: a progress bar while it renders, then the grid and a line, or one message."""
    s = settings

    def on_compare(name, progress=gr.Progress()):
        if not name:
            raise AppError("Pick a run first.")
        started = time.monotonic()
        grid = compare_run(s, Path(s.runs_dir) / name, progress=lambda share, what: progress(share, desc=what))
        return gr.update(value=grid, visible=True), compared_text(name, time.monotonic() - started)

    def show_box(name):
        """The grid's box is shown first (for a run with checkpoints): Gradio draws the progress bar (checkpoint
        k of n) over an event's outputs, and over a hidden one the user saw nothing for minutes."""
        return gr.update(visible=bool(name and checkpoint_dirs(Path(s.runs_dir) / name))), ""

    compare_outputs = [c["compare"], c["compare_status"]]
    c["compare_btn"].click(show_box, [c["picked"]], compare_outputs, show_progress="hidden").then(
        guarded(on_compare, compare_outputs, c["compare_status"]), [c["picked"]], compare_outputs,
        concurrency_limit=1)
