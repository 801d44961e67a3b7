"""Generate tab: the base model with up to four adapters blended at their weights, comparison grids, blend export."""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from trainer import generation_defaults, list_runs

from .. import generation as G
from ..errors import AppError, guarded
from ..forms import model_note
from ..settings import AppSettings

HELP = ("Try your adapters on the base model. Each slot adds one adapter at its weight (1 = as trained, 0 = off, "
        "negative = the opposite); the enabled ones are blended exactly into the model weights, so the images are "
        "what A1111 or ComfyUI would draw. Generation waits while a training runs: one device, one job.")


def slots_from(values: list) -> list[G.Slot]:
    """[path, weight, enabled] * NUM_SLOTS from the widgets -> Slots."""
    return [G.Slot(values[i] or "", float(values[i + 1] or 0), bool(values[i + 2])) for i in range(0, len(values), 3)]


def blend_rank(value) -> int | None:
    """The rank box: empty or 0 means exact (the ranks add up), a positive number compresses by SVD."""
    if value in (None, ""):
        return None
    rank = int(value)
    if rank < 0:
        raise AppError(f"Rank {rank} is negative: leave it at 0 for an exact blend, or give a rank such as 16.")
    return rank or None


def lycoris_rank(value) -> int | None:
    """The LyCORIS rank box: the rank a blend that cannot be written exactly becomes a plain LoRA at (empty: none;
    only a blend that needs it asks for it)."""
    if value in (None, ""):
        return None
    if int(value) < 1:
        raise AppError("The rank for LyCORIS layers must be at least 1 (32, say): a blend holding LoHa, LoKr or DoRA "
                       "layers is written as a plain LoRA of that rank.")
    return int(value)


def blend_status(path: Path, kept: str) -> str:
    return " ".join(filter(None, [f"Wrote **{path.name}**; it is in the adapter lists now.", kept]))


def run_names(settings: AppSettings) -> list[str]:
    return [info.run_dir.name for info in list_runs(settings.runs_dir)]


# ----------------------------------------------------------------------------------------------------------------
# layout

def _slots_column(settings: AppSettings, c: dict) -> None:
    c["model"] = gr.Textbox(settings.base_model, label="Base model", elem_id="gen-model",
                            placeholder="empty = the tiny built-in model",
                            info="A diffusers folder or a .safetensors checkpoint (SD 1.x, 2.x, SDXL, SD 3/3.5 or "
                                 "FLUX.1); loaded once and kept.")
    c["model_note"] = gr.Markdown(model_note(settings.base_model), elem_id="gen-model-note")
    choices = G.adapter_choices(settings)
    c["slots"] = []
    for i in range(G.NUM_SLOTS):
        with gr.Group():
            with gr.Row():
                path = gr.Dropdown(choices, value=None, label=f"Adapter {i + 1}", scale=4, allow_custom_value=True,
                                   elem_id=f"slot-{i}-adapter")
                on = gr.Checkbox(True, label="On", scale=1, min_width=60, elem_id=f"slot-{i}-on")
            weight = gr.Slider(-1, 2, value=1.0, step=0.05, label="Weight", elem_id=f"slot-{i}-weight")
        c["slots"] += [path, weight, on]
    gr.Markdown("**Add an adapter file** (`.safetensors`, kohya or diffusers layout):")
    c["upload"] = gr.File(label="Add an adapter file", file_types=[".safetensors"], height=110, show_label=False,
                          elem_id="adapter-upload")
    c["refresh_btn"] = gr.Button("Refresh adapter list", size="sm")


def _image_column(settings: AppSettings, c: dict) -> None:
    start = generation_defaults(settings.base_model)  # what the model's training samples use (the engine's rule)
    c["prompt"] = gr.Textbox(label="Prompt", lines=2, elem_id="gen-prompt")
    # FluxPipeline uses a negative prompt only with true_cfg_scale > 1 (diffusers 0.42.1 pipeline_flux.py l. 768-771),
    # which loradesk does not pass: FLUX.1 draws without it
    c["negative"] = gr.Textbox(start["negative_prompt"], label="Negative prompt", elem_id="gen-negative",
                               info="Not used by FLUX.1 (guidance-distilled: Guidance is its embedded value).")
    with gr.Row():
        c["seed"] = gr.Number(start["seed"], label="Seed", precision=0, minimum=0, elem_id="gen-seed",
                              info="A run's first sample prompt uses this seed, the next one seed + 1.")
        c["steps"] = gr.Slider(1, 100, value=start["steps"], step=1, label="Steps", elem_id="gen-steps")
        c["guidance"] = gr.Slider(0, 20, value=start["guidance"], step=0.5, label="Guidance", elem_id="gen-guidance")
    with gr.Row():
        c["width"] = gr.Slider(64, 1536, value=start["size"], step=8, label="Width", elem_id="gen-width")
        c["height"] = gr.Slider(64, 1536, value=start["size"], step=8, label="Height", elem_id="gen-height")
        c["count"] = gr.Slider(1, 8, value=1, step=1, label="Images", elem_id="gen-count")
    c["gen_btn"] = gr.Button("Generate", variant="primary", elem_id="gen-btn")
    c["status"] = gr.Markdown(elem_id="gen-status")
    c["gallery"] = gr.Gallery(label="Images", columns=4, height=360, elem_id="gen-gallery", format="png")


def _grid_box(settings: AppSettings, c: dict) -> None:
    with gr.Accordion("Comparison grid", open=False):
        gr.Markdown("Rows: weights of adapter 1 (for example `0, 0.5, 1`), or every checkpoint of a run. "
                    "Columns: seeds.")
        with gr.Row():
            c["rows_kind"] = gr.Radio(["weights of adapter 1", "checkpoints of a run"],
                                      value="weights of adapter 1", label="Rows")
            c["weights"] = gr.Textbox("0, 0.5, 1", label="Weights")
            c["run"] = gr.Dropdown(run_names(settings), label="Run", allow_custom_value=False, elem_id="grid-run")
            c["seeds"] = gr.Textbox("1, 2, 3", label="Seeds")
        c["grid_btn"] = gr.Button("Draw the grid", elem_id="grid-btn")
        c["grid"] = gr.Image(label="Grid", interactive=False, format="png", elem_id="grid-image")


def _analysis_box(c: dict) -> None:
    with gr.Accordion("What did the LoRA learn? (analysis)", open=False):
        gr.Markdown("The singular values of each layer's update (how many directions it really uses) and, for the "
                    "adapters in two slots, how much their top directions overlap: the analysis of the LoRA paper, "
                    "section 7.")
        c["analyze_btn"] = gr.Button("Analyse the adapters in the first two filled slots", elem_id="analyze-btn")
        c["analysis_text"] = gr.Markdown()
        c["heatmaps"] = gr.Gallery(label="Subspace similarity per layer", columns=4, height=320, format="png")


def _blend_box(c: dict) -> None:
    with gr.Accordion("Export the blend", open=False):
        gr.Markdown("Write the enabled adapters at their weights as one adapter file (exact: the ranks add up; give "
                    "a rank to compress it by SVD; LyCORIS layers always go through SVD). The file appears in the "
                    "adapter lists above.")
        with gr.Row():
            c["rank"] = gr.Number(0, label="Rank (0 = exact)", precision=0, elem_id="blend-rank",
                                  info="0 adds the ranks up exactly; 16, for example, compresses by SVD.")
            c["lycoris_rank"] = gr.Number(G.LYCORIS_BLEND_RANK, label="Rank for LyCORIS blends", precision=0,
                                          elem_id="blend-lycoris-rank",
                                          info="Used at rank 0 when an adapter has LoHa, LoKr, Tucker LoCon or DoRA "
                                               "layers: no exact sum of those is one file, so the blend becomes a "
                                               "plain LoRA of this rank by SVD (the status says the norm it kept).")
            c["blend_btn"] = gr.Button("Export blend", elem_id="blend-btn")
        c["blend_file"] = gr.File(label="Blend file", interactive=False, visible=False, elem_id="blend-file")


def build(settings: AppSettings, demo: gr.Blocks, tab: gr.Tab) -> None:
    c: dict = {}
    gr.Markdown(HELP)
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=340):
            _slots_column(settings, c)
        with gr.Column(scale=2):
            _image_column(settings, c)
            _grid_box(settings, c)
            _analysis_box(c)
            _blend_box(c)
    _wire_images(settings, c)
    _wire_tools(settings, c)
    _wire_lists(settings, demo, tab, c)


# ----------------------------------------------------------------------------------------------------------------
# wiring

def _wire_images(settings: AppSettings, c: dict) -> None:
    s, inputs = settings, [c["model"], *c["slots"]]
    size_inputs = [c["prompt"], c["negative"], c["seed"], c["steps"], c["guidance"], c["width"], c["height"],
                   c["count"]]

    # gr.Progress comes first: Gradio finds it only among the positional parameters
    def on_generate(progress=gr.Progress(), model_path="", *rest):
        slot_values, (p, n, sd, st, g, w, h, k) = rest[:-8], rest[-8:]
        images = G.generate(s, model_path, slots_from(list(slot_values)), p, n, int(sd or 0), st, g, w, h, k,
                            progress=lambda share, what: progress(share, desc=what))
        return images, ""

    outputs = [c["gallery"], c["status"]]
    c["gen_btn"].click(guarded(on_generate, outputs, c["status"]), inputs + size_inputs, outputs,
                       concurrency_limit=1, concurrency_id="device")

    def on_grid(progress=gr.Progress(), model_path="", *rest):
        slot_values, (p, n, st, g, w, h, kind, wts, run_name, sds) = rest[:-10], rest[-10:]
        slots = slots_from(list(slot_values))
        rows = _grid_rows(s, slots, kind, wts, run_name)
        grid = G.comparison_grid(s, model_path, slots, p, rows, G.parse_numbers(sds, int), n, st, g, w, h,
                                 progress=lambda share, what: progress(share, desc=what))
        return grid, ""

    grid_inputs = [c["prompt"], c["negative"], c["steps"], c["guidance"], c["width"], c["height"], c["rows_kind"],
                   c["weights"], c["run"], c["seeds"]]
    c["grid_btn"].click(guarded(on_grid, [c["grid"], c["status"]], c["status"]), inputs + grid_inputs,
                        [c["grid"], c["status"]], concurrency_limit=1, concurrency_id="device")

    before = gr.State(settings.base_model)

    def on_model(path, old):
        """A new base model brings its native size, sampling steps and guidance, and family note; leaving the box
        unchanged keeps the user's values."""
        if path == old:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), old, gr.skip()
        start = generation_defaults(path or "")
        return start["size"], start["size"], start["steps"], start["guidance"], path, model_note(path)

    model_outputs = [c["width"], c["height"], c["steps"], c["guidance"], before, c["model_note"]]
    for event in (c["model"].blur, c["model"].submit):
        event(on_model, [c["model"], before], model_outputs, show_progress="hidden")


def _grid_rows(settings: AppSettings, slots: list[G.Slot], kind: str, weights: str, run_name: str | None) -> list:
    if kind.startswith("weights"):
        if not slots[0].path:
            raise AppError("Pick an adapter in slot 1: the rows are its weights.")
        return G.parse_numbers(weights)
    if not run_name:
        raise AppError("Pick a run: the rows are its checkpoints.")
    return G.checkpoint_rows(Path(settings.runs_dir) / run_name)


def _wire_tools(settings: AppSettings, c: dict) -> None:
    s, inputs = settings, [c["model"], *c["slots"]]
    paths = c["slots"][0::3]

    def on_blend(model_path, *rest):
        slot_values, (r, lr) = rest[:-2], rest[-2:]
        path, kept = G.export_blend_report(s, model_path, slots_from(list(slot_values)), blend_rank(r),
                                           lycoris_rank(lr))
        return gr.update(value=str(path), visible=True), blend_status(path, kept), *_choices(s)

    blend_outputs = [c["blend_file"], c["status"], *paths, c["run"]]
    c["blend_btn"].click(guarded(on_blend, blend_outputs, c["status"]), inputs + [c["rank"], c["lycoris_rank"]],
                         blend_outputs, concurrency_limit=1, concurrency_id="device")

    def on_analyze(progress=gr.Progress(), *slot_values):
        images, text = G.analyze_slots(s, slots_from(list(slot_values)),
                                       progress=lambda share, what: progress(share, desc=what))
        return images, text, ""

    analysis_outputs = [c["heatmaps"], c["analysis_text"], c["status"]]
    c["analyze_btn"].click(guarded(on_analyze, analysis_outputs, c["status"]), c["slots"], analysis_outputs)


def _choices(settings: AppSettings) -> list:
    """New choices for the four adapter dropdowns and the grid's run list (the picked values stay)."""
    new = G.adapter_choices(settings)
    return [gr.update(choices=new) for _ in range(G.NUM_SLOTS)] + [gr.update(choices=run_names(settings))]


def _wire_lists(settings: AppSettings, demo: gr.Blocks, tab: gr.Tab, c: dict) -> None:
    s = settings
    paths = c["slots"][0::3]
    lists = [*paths, c["run"]]

    def on_upload(file, model_path):
        if file is None:
            return [gr.skip() for _ in lists] + [gr.skip(), gr.skip()]
        saved = G.add_adapter_upload(s, file, model_path or "")
        return _choices(s) + [None, f"Added **{saved.name}**: pick it in a slot."]

    upload_outputs = lists + [c["upload"], c["status"]]
    c["upload"].upload(guarded(on_upload, upload_outputs, c["status"], clear=[c["upload"]]),
                       [c["upload"], c["model"]], upload_outputs)
    c["refresh_btn"].click(lambda: _choices(s), None, lists)
    demo.load(lambda: _choices(s), None, lists)
    tab.select(lambda: _choices(s), None, lists)  # runs finished since the page loaded show up
