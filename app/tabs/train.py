"""Train tab: a form generated from trainer.config.fields(), Start/Stop, and a live view read from the run folder."""
from __future__ import annotations

import html
from pathlib import Path

import gradio as gr

from trainer import config as C

from .. import datasets as D
from .. import training as T
from ..generation import export_run_adapter
from ..settings import AppSettings

HELP = ("Pick a preset and a dataset, check the basic settings and press **Start**. The training runs in its own "
        "process: you can close the browser, and every run below survives an app restart. **Alpha**: the update "
        "is scaled by alpha/rank, so alpha = rank means scale 1 and a lower alpha needs a higher learning rate.")
SECTION_TITLES = {"run": "Run", "model": "Base model", "dataset": "Dataset and buckets", "network": "LoRA network",
                  "optimizer": "Optimizer", "schedule": "Schedule", "loss": "Loss", "precision": "Precision and memory",
                  "sampling": "Samples during training", "saving": "Saving and checkpoints"}
SECTION_WORDS = {"run": "Run", "model": "Model", "dataset": "Dataset", "network": "LoRA", "optimizer": "Optimizer",
                 "schedule": "Schedule", "loss": "Loss", "precision": "Precision", "sampling": "Sample",
                 "saving": "Checkpoint"}
FIELDS_PER_ROW = 2


# ----------------------------------------------------------------------------------------------------------------
# handlers: plain values in, plain values out

def check_form(values: list) -> tuple[dict[str, str], str]:
    """Problems by field key, and a one-line summary for the Start button's status."""
    _, errors = T.values_to_config(values)
    if not errors:
        return {}, "Ready to start."
    general = f" {errors['']}" if "" in errors else ""  # a problem no single field owns
    return errors, f"{len(errors)} setting(s) need a fix before starting (marked in the form).{general}"


def start(settings: AppSettings, values: list) -> tuple[Path, str]:
    cfg, errors = T.values_to_config(values)
    if errors:
        raise T.AppError("Not started: " + "; ".join(errors.values()))
    run_dir = T.start_run(settings, cfg)
    return run_dir, f"Started **{run_dir.name}**."


def live(settings: AppSettings, followed: str | None) -> dict:
    """Everything the live view shows, for the followed run (default: the active one, else the newest)."""
    run_dir = Path(settings.runs_dir) / followed if followed else T.latest_run(settings)
    if run_dir is None or not run_dir.is_dir():
        return {"run_dir": None, "progress": progress_html(None), "status": "No runs yet: press Start.",
                "losses": [], "samples": [], "failure": "", "state": ""}
    view = T.run_view(run_dir)
    return {"run_dir": run_dir, "progress": progress_html(view), "status": status_text(view),
            "losses": view.losses, "samples": view.samples, "failure": failure_text(view), "state": view.state}


def progress_html(view: T.RunView | None) -> str:
    pct = 100 * view.fraction if view else 0
    colour = {"failed": "#d9534f", "stopped": "#e0a800", "finished": "#2e9e5b"}.get(view.state if view else "",
                                                                                   "var(--color-accent)")
    label = f"{view.step} / {view.total_steps} steps" if view else "no run"
    return (f'<div class="ld-progress" role="progressbar" aria-valuenow="{pct:.0f}" aria-valuemin="0" '
            f'aria-valuemax="100"><div class="ld-bar" style="width:{pct:.1f}%;background:{colour}"></div>'
            f'<span class="ld-label">{html.escape(label)}</span></div>')


def status_text(view: T.RunView) -> str:
    parts = [f"**{view.run_dir.name}** is **{view.state}**", f"step {view.step}/{view.total_steps}"]
    if view.state == "running":
        parts += [f"{view.it_per_s:.2f} it/s", f"ETA {T.format_eta(view.eta_s)}"]
    if view.losses:
        parts.append(f"loss {view.losses[-1][1]:.4f}")
    text = " · ".join(parts)
    if view.adapter_path and view.state in ("finished", "stopped"):
        text += f"  \nAdapter: `{view.adapter_path}`"
    if view.messages:
        text += "  \n" + "  \n".join(html.escape(m) for m in view.messages[-3:])
    return text


def failure_text(view: T.RunView) -> str:
    if view.state != "failed":
        return ""
    text = f"### The run failed at step {view.step}\n{html.escape(view.error or 'no error message was written')}"
    if view.advice:
        text += f"\n\n**What to try:** {html.escape(view.advice)}"
    return text + "\n\nOpen **Training log** below for the details. To continue from the last checkpoint, pick " \
                  "the run under **Runs** and press **Resume**."


MAX_PLOT_POINTS = 1000


def loss_frame(losses: list[tuple[int, float]]):
    """The loss curve for gr.LinePlot, thinned to at most ~MAX_PLOT_POINTS (it is re-sent every second)."""
    import pandas as pd  # gradio's own dependency; LinePlot takes a DataFrame
    stride = max(1, len(losses) // MAX_PLOT_POINTS)
    losses = losses[::stride] + ([losses[-1]] if losses and (len(losses) - 1) % stride else [])
    return pd.DataFrame({"step": [s for s, _ in losses], "loss": [v for _, v in losses]})


def run_names(settings: AppSettings) -> list[str]:
    return [row[0] for row in T.runs_table(settings)]


# ----------------------------------------------------------------------------------------------------------------
# layout

def display_label(info: C.FieldInfo) -> str:
    """The field's label, with its section in front where another section has the same one ("Name" twice)."""
    same = [i for i in C.fields() if i.label == info.label]
    return f"{SECTION_WORDS.get(info.section, info.section)} {info.label.lower()}" if len(same) > 1 else info.label


def bounds_text(info: C.FieldInfo) -> str:
    if info.min is not None and info.max is not None:
        return f" ({info.min:g} to {info.max:g})"
    if info.min is not None and info.min != 0:
        return f" (at least {info.min:g})"
    return ""


def component_for(info: C.FieldInfo, value):
    """The widget of one config field: choices -> Dropdown, bool -> Checkbox, numbers -> Number, list -> Textbox."""
    common = {"label": display_label(info), "info": info.help, "elem_id": "field-" + info.key.replace(".", "-")}
    if info.choices:
        return gr.Dropdown(info.choices, value=value, **common)
    if info.type is bool:
        return gr.Checkbox(value=value, **common)
    if info.type in (int, float):
        # bounds go in the text, not the widget: Gradio would reject an out-of-range value with a toast, while
        # validate() names the problem next to the field
        common["info"] += bounds_text(info)
        return gr.Number(value=value, precision=0 if info.type is int else None, **common)
    if info.type is list:
        common["info"] += " One per line."
        return gr.Textbox(value=value, lines=2, max_lines=8, **common)
    return gr.Textbox(value=value, **common)


def _field_grid(infos: list[C.FieldInfo], values: dict) -> tuple[list, list]:
    comps, errs = [], []
    for i in range(0, len(infos), FIELDS_PER_ROW):
        with gr.Row(equal_height=False):
            for info in infos[i:i + FIELDS_PER_ROW]:
                with gr.Column(min_width=220):
                    comps.append(component_for(info, values[info.key]))
                    errs.append(gr.Markdown(visible=False, elem_classes=["ld-field-error"],
                                            elem_id="error-" + info.key.replace(".", "-")))
    return comps, errs


def _form(infos: list[C.FieldInfo], values: dict) -> tuple[list, list, dict]:
    """Basic fields in view, the rest in one collapsed group per section; returns widgets in fields() order."""
    comps_by_key, errs_by_key = {}, {}
    groups = [("", [i for i in infos if i.basic])]
    groups += [(s, [i for i in infos if i.section == s and not i.basic]) for s in C.SECTIONS]
    for section, members in groups:
        if not members:
            continue
        if section:
            with gr.Accordion(f"More: {SECTION_TITLES.get(section, section)}", open=False):
                comps, errs = _field_grid(members, values)
        else:
            comps, errs = _field_grid(members, values)
        comps_by_key.update(zip([i.key for i in members], comps))
        errs_by_key.update(zip([i.key for i in members], errs))
    return [comps_by_key[i.key] for i in infos], [errs_by_key[i.key] for i in infos], comps_by_key


def build(settings: AppSettings, demo: gr.Blocks, dataset_picker: gr.Dropdown, bucket_resolution: gr.Number) -> None:
    cfg = T.default_config(settings)
    infos = T.form_fields()
    values = dict(zip([i.key for i in infos], T.config_to_values(cfg)))
    presets = T.list_presets(settings)
    gr.Markdown(HELP)
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            with gr.Row():
                preset = gr.Dropdown(presets, value=None, label="Preset", elem_id="preset-picker",
                                     info="Start from tested settings (files in presets/); the fields follow.")
                dataset = gr.Dropdown(D.list_datasets(settings.data_dir), value=None, label="Dataset",
                                      elem_id="train-dataset", info="A dataset from the Dataset tab.")
            form, form_errs, comps_by_key = _form(infos, values)
        with gr.Column(scale=2):
            with gr.Row():
                start_btn = gr.Button("Start training", variant="primary", elem_id="start-btn", scale=2)
                stop_btn = gr.Button("Stop", variant="stop", elem_id="stop-btn", scale=1)
            form_status = gr.Markdown(elem_id="form-status")
            progress = gr.HTML(progress_html(None), elem_id="train-progress")
            status = gr.Markdown(elem_id="train-status")
            failure = gr.Markdown(elem_id="train-failure", elem_classes=["ld-failure"])
            loss_plot = gr.LinePlot(loss_frame([]), x="step", y="loss", title="Training loss", height=220,
                                    elem_id="loss-plot")
            samples = gr.Gallery(label="Latest samples", columns=4, height=180, elem_id="train-samples")
            with gr.Row():
                save_btn = gr.Button("Save checkpoint now", size="sm")
                sample_btn = gr.Button("Render samples now", size="sm")
            with gr.Accordion("Training log", open=False) as log_box:
                log = gr.Textbox(lines=14, max_lines=30, show_label=False, elem_id="train-log")
                log_btn = gr.Button("Reload log", size="sm")
            gr.Markdown("### Runs\nStopped or crashed runs can be resumed from their last checkpoint.")
            runs = gr.Dataframe(T.runs_table(settings), headers=["run", "state", "step", "started", "adapter"],
                                interactive=False, elem_id="runs-table", max_height=220)
            picked = gr.Dropdown(run_names(settings), value=None, label="Run", elem_id="run-picker",
                                 info="Follow it in the live view, resume it, or download its adapter.")
            with gr.Row():
                fmt = gr.Dropdown(["kohya", "diffusers"], value="kohya", label="Format",
                                  info="kohya: A1111, ComfyUI, Forge, diffusers.")
                dtype = gr.Dropdown(["fp16", "fp32", "bf16"], value="fp16", label="Precision")
            with gr.Row():
                follow_btn = gr.Button("Follow", size="sm")
                resume_btn = gr.Button("Resume", size="sm", elem_id="resume-btn")
                export_btn = gr.Button("Download adapter", size="sm", elem_id="export-btn")
            download = gr.File(label="Adapter file", interactive=False, elem_id="run-download", visible=False)
    followed = gr.State(None)
    timer = gr.Timer(1.0)
    slow_timer = gr.Timer(5.0)

    s = settings

    def guard(fn):
        def wrapper(*args):
            try:
                return fn(*args)
            except (T.AppError, C.ConfigError, ValueError, OSError) as e:
                raise gr.Error(str(e)) from None
        return wrapper

    def on_check(*vals):
        errors, summary = check_form(list(vals))
        updates = [gr.update(visible=i.key in errors, value=f"⚠ {errors.get(i.key, '')}") for i in infos]
        return (*updates, summary)

    gr.on([c.change for c in form], on_check, form, form_errs + [form_status], show_progress="hidden",
          trigger_mode="always_last")

    def on_preset(name, ds_name):
        if not name:
            return [gr.update() for _ in form]
        path = str(D.dataset_dir(s.data_dir, ds_name).resolve()) if ds_name else ""
        return T.config_to_values(T.load_preset(s, name, path))

    preset.change(guard(on_preset), [preset, dataset], form)

    def on_dataset(name):
        return str(D.dataset_dir(s.data_dir, name).resolve()) if name else gr.update()

    dataset.change(guard(on_dataset), [dataset], [comps_by_key["dataset.path"]])
    comps_by_key["dataset.resolution"].change(lambda r: r if r else gr.update(), [comps_by_key["dataset.resolution"]],
                                              [bucket_resolution], show_progress="hidden")
    dataset_picker.change(lambda name: gr.update(choices=D.list_datasets(s.data_dir), value=name),
                          [dataset_picker], [dataset])

    def render(followed_name):
        v = live(s, followed_name)
        return v["progress"], v["status"], loss_frame(v["losses"]), v["samples"] or None, v["failure"]

    view_outputs = [progress, status, loss_plot, samples, failure]

    def on_start(*vals):
        _, text = start(s, list(vals))
        return (None, text, gr.update(value=T.runs_table(s)), gr.update(choices=run_names(s)))

    start_btn.click(guard(on_start), form, [followed, form_status, runs, picked], concurrency_limit=1).then(
        render, [followed], view_outputs)

    def command(name: str):
        def handler(followed_name):
            run_dir = Path(s.runs_dir) / followed_name if followed_name else T.active_run(s)
            if run_dir is not None and T.run_view(run_dir).state != "running":
                run_dir = T.active_run(s)
            gr.Info(T.send(run_dir, name))
        return handler

    stop_btn.click(guard(command("stop")), [followed], None)
    save_btn.click(guard(command("save")), [followed], None)
    sample_btn.click(guard(command("sample")), [followed], None)
    timer.tick(render, [followed], view_outputs, show_progress="hidden")

    def refresh_runs(current):
        names = run_names(s)
        return T.runs_table(s), gr.update(choices=names, value=current if current in names else None)

    def refresh_run_choices():
        # choices only: a tick that wrote the picked value back could undo a pick made while it was in flight
        return T.runs_table(s), gr.update(choices=run_names(s))

    slow_timer.tick(refresh_run_choices, None, [runs, picked], show_progress="hidden")
    demo.load(refresh_runs, [picked], [runs, picked])
    demo.load(lambda: gr.update(choices=D.list_datasets(s.data_dir)), None, [dataset])

    follow_btn.click(lambda name: name, [picked], [followed]).then(render, [followed], view_outputs)

    def on_resume(name):
        if not name:
            raise T.AppError("Pick a run to resume first.")
        run_dir = T.resume_run(s, Path(s.runs_dir) / name)
        gr.Info(f"Resuming {run_dir.name} from its last checkpoint.")
        return None, *refresh_runs(name)

    resume_btn.click(guard(on_resume), [picked], [followed, runs, picked], concurrency_limit=1)

    def on_export(name, format, precision):
        if not name:
            raise T.AppError("Pick a run first.")
        path = export_run_adapter(Path(s.runs_dir) / name, Path(s.adapters_dir) / "exports", format, precision)
        return gr.update(value=str(path), visible=True)

    export_btn.click(guard(on_export), [picked, fmt, dtype], [download])
    log_btn.click(lambda f: T.read_log(Path(s.runs_dir) / f if f else T.latest_run(s)), [followed], [log])
    log_box.expand(lambda f: T.read_log(Path(s.runs_dir) / f if f else T.latest_run(s)), [followed], [log])
