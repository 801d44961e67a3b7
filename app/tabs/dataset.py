"""Dataset tab: drop images (or a zip, or a folder path), caption them, see what the trainer will see."""
from __future__ import annotations

import sys
from contextlib import contextmanager

import gradio as gr

from trainer import (CAPTIONER_MEMORY, UserError, active_run, caption_dataset, dataset_trigger, load_captioner,
                     native_resolution, preview_captions, runner_active)

from .. import datasets as D
from ..device import free_device, get_captioner, release_models
from ..errors import AppError, guarded, user_message
from ..files import UploadError, safe_dirname
from ..generation import take_device
from ..settings import AppSettings

HELP = ("Each dataset is a folder under **{data_dir}/** with your images and a same-name `.txt` caption for each. "
        "Every edit is saved at once, so closing the browser loses nothing. 10 to 30 varied images of one subject "
        "or style are plenty; subfolders named like `10_dog` repeat their images 10 times per epoch. The gallery "
        "shows each caption as it is trained: with the dataset's trigger in front when the caption lacks it.")


# ----------------------------------------------------------------------------------------------------------------
# handlers: plain functions of plain values, each returning the values of its outputs

def gallery_value(settings: AppSettings, name: str | None) -> list[tuple[str, str]]:
    if not name:
        return []
    return [(str(i.path), f"skipped: {i.skipped}" if i.skipped else (i.trained_as or "(no caption)"))
            for i in D.load_items(D.dataset_dir(settings.data_dir, name))]


def summary_values(settings: AppSettings, name: str | None, resolution: int = 512) -> tuple[str, list, list]:
    if not name:
        return "Pick or create a dataset.", [], []
    s = D.summarize(D.dataset_dir(settings.data_dir, name), max(32, int(resolution or 512)))
    return s.text, s.buckets, s.skipped


def refresh(settings: AppSettings, name: str | None, resolution: int = 512):
    """gallery, summary text, buckets, skipped."""
    text, buckets, skipped = summary_values(settings, name, resolution)
    return gallery_value(settings, name), text, buckets, skipped


def create(settings: AppSettings, new_name: str) -> tuple[str, list[str], str]:
    """Create (or open) a dataset; returns its name, the dropdown choices and what to tell the user (including the
    name it got, when that is not what was typed)."""
    folder = D.create_dataset(settings.data_dir, new_name)
    renamed = "" if folder.name == new_name.strip() else (
        f" (named **{folder.name}**: a dataset name is one folder of letters, digits, '-', '_' and '.')")
    return folder.name, D.list_datasets(settings.data_dir), \
        f"Dataset **{folder.name}** is ready{renamed}: drop images on the left."


def upload(settings: AppSettings, name: str | None, files: list) -> str:
    if not files:
        return "Nothing uploaded."
    if not name:
        raise UploadError("Create or pick a dataset first (top left), then drop the images again.")
    return D.add_uploads(D.dataset_dir(settings.data_dir, name), files).text()


def import_folder(settings: AppSettings, source: str, new_name: str = ""):
    """Copy a folder in as a new dataset; returns its name, the dropdown choices and a report."""
    folder, report = D.import_folder(settings.data_dir, source, new_name, settings.readable_dirs())
    return folder.name, D.list_datasets(settings.data_dir), f"Dataset **{folder.name}**: {report.text()}"


def select(settings: AppSettings, name: str | None, index: int | None) -> tuple[str | None, str | None, str]:
    """The picked image: (its name, its path for the preview, its caption file's text)."""
    items = D.load_items(D.dataset_dir(settings.data_dir, name)) if name else []
    if index is None or not 0 <= index < len(items):
        return None, None, ""
    item = items[index]
    return item.name, str(item.path), item.caption


def save_caption(settings: AppSettings, name: str | None, item: str | None, caption: str) -> str:
    if not item:
        return "Click an image in the gallery first."
    D.save_caption(D.dataset_dir(settings.data_dir, name), item, caption)
    return f"Saved the caption of {item}."


def next_index(settings: AppSettings, name: str | None, item: str | None) -> int | None:
    items = [i.name for i in D.load_items(D.dataset_dir(settings.data_dir, name))] if name else []
    if item not in items:
        return 0 if items else None
    return (items.index(item) + 1) % len(items)


def set_trigger(settings: AppSettings, name: str | None, trigger: str) -> str:
    saved = D.set_trigger(D.dataset_dir(settings.data_dir, name), trigger)
    return (f"The trigger of **{name}** is **{saved}**: training puts it in front of each caption that lacks it."
            if saved else f"**{name}** has no trigger now: its captions train as they are.")


def apply_trigger(settings: AppSettings, name: str | None, trigger: str) -> str:
    n = D.apply_trigger(D.dataset_dir(settings.data_dir, name), trigger)
    return f"Wrote '{trigger.strip()}' into {n} caption(s) that lacked it."


def find_replace(settings: AppSettings, name: str | None, find: str, replace: str) -> str:
    n = D.find_replace(D.dataset_dir(settings.data_dir, name), find, replace)
    return f"Replaced '{find}' in {n} caption(s)."


def remove(settings: AppSettings, name: str | None, item: str | None) -> str:
    if not item:
        return "Click an image in the gallery first."
    D.remove_image(D.dataset_dir(settings.data_dir, name), item)
    return f"Removed {item} and its caption."


def trigger_value(settings: AppSettings, name: str | None) -> str:
    return dataset_trigger(settings.data_dir / safe_dirname(name)) if name else ""


# ----------------------------------------------------------------------------------------------------------------
# captions by a local model: a preview that writes nothing, then the write (trainer.preview_captions and
# caption_dataset); the model stays loaded between the two while its folder and device are unchanged

PREVIEW_IMAGES = 4
PREVIEW_HEADERS = ["image", "proposed caption", "as trained (trigger rule)", "existing caption"]
CAPTION_MODE_CHOICES = [("what the model writes", "auto"), ("sentences (Florence-2, BLIP, Qwen-VL)", "sentence"),
                        ("tags (a WD tagger)", "tags")]


def caption_help() -> str:
    """What each captioner kind needs in memory (the engine's figures), one small line each."""
    return "<small>Memory for the weights:\n\n" + "\n".join(f"- {v}" for v in CAPTIONER_MEMORY.values()) + \
        "</small>"


def preview_caption_rows(settings: AppSettings, name: str | None, model: str, mode: str = "auto", prefix: str = "",
                         suffix: str = "", overwrite: bool = False, progress=None) -> tuple[list[list[str]], str]:
    """The captions the first few images to caption would get, and a status line; nothing is written."""
    folder = D.dataset_dir(settings.data_dir, name)
    messages: list[str] = []
    with _captioning(settings, model, mode, prefix, suffix, overwrite, progress) as (captioner, options, where):
        results = preview_captions(folder, captioner, PREVIEW_IMAGES, options, message=messages.append)
    if not results:
        readable = [i for i in D.load_items(folder) if not i.skipped]
        text = ("Every image has a caption: tick 'Replace existing captions' to caption them again."
                if readable and not overwrite else "No image to caption: drop some on the left.")
    else:
        text = (f"Preview of {len(results)} image(s){where}: nothing was written. Press 'Write captions' to "
                f"caption every image " + ("(existing captions replaced)." if overwrite else "without a caption."))
    if messages:
        text += " " + "; ".join(D.short_message(folder, m) for m in messages[:5])
    return D.preview_rows(folder, results), text


def write_captions(settings: AppSettings, name: str | None, model: str, mode: str = "auto", prefix: str = "",
                   suffix: str = "", overwrite: bool = False, progress=None) -> str:
    """Caption the dataset (each file written atomically; existing captions kept unless `overwrite`); returns the
    status line, naming each image that could not be read."""
    folder = D.dataset_dir(settings.data_dir, name)

    def done(n: int, total: int) -> None:
        if progress is not None:
            progress(n / total, f"captions: {n} of {total} images")
    with _captioning(settings, model, mode, prefix, suffix, overwrite, progress) as (captioner, options, where):
        report = caption_dataset(folder, captioner, options, progress=done)
    return D.caption_report_text(folder, report, where)


def reselect(settings: AppSettings, name: str | None, item: str | None) -> tuple[str | None, str | None, str]:
    """The editor's image again with its caption re-read from disk (a caption just written shows at once)."""
    names = [i.name for i in D.load_items(D.dataset_dir(settings.data_dir, name))] if name else []
    return select(settings, name, names.index(item)) if item in names else (None, None, "")


@contextmanager
def _captioning(settings: AppSettings, model: str, mode, prefix, suffix, overwrite, progress):
    """(captioner, options, where) under the device lock: a generation waits and a training start is refused
    meanwhile, and while a run trains the captioner runs on the CPU so the training keeps the device memory."""
    source = D.caption_model(model, settings.readable_dirs())
    training, queue = active_run(settings.runs_dir), runner_active(settings.runs_dir)
    options = D.caption_options(mode, prefix, suffix, overwrite, "cpu" if training or queue else None)
    where = (f" on the CPU (run {training.name} is training on the device)" if training
             else " on the CPU (the queue may start a training on the device)" if queue else "")
    take_device(progress)
    try:
        def load():
            if progress is not None:
                progress(0.0, "loading the caption model")
            return load_captioner(source, options)
        yield get_captioner(("caption", source, options.device), load), options, where
    except Exception as e:
        if _out_of_memory(e):
            release_models()  # what the failed batch held goes back to the device
            raise AppError("The device ran out of memory while captioning: choose a smaller captioner (see the "
                           "memory line) or stop what else uses the GPU.") from None
        raise
    finally:
        free_device()


def _out_of_memory(error: BaseException) -> bool:
    torch = sys.modules.get("torch")  # loaded by then when a transformers captioner ran; a tagger needs none
    return torch is not None and isinstance(error, torch.OutOfMemoryError)


# ----------------------------------------------------------------------------------------------------------------
# layout

def _left_column(settings: AppSettings, c: dict) -> None:
    datasets = D.list_datasets(settings.data_dir)
    c["picker"] = gr.Dropdown(datasets, value=datasets[0] if datasets else None, label="Dataset",
                              elem_id="dataset-picker", interactive=True)
    with gr.Row():
        c["new_name"] = gr.Textbox(label="New dataset", placeholder="my-dog", scale=3, elem_id="new-dataset")
        c["create_btn"] = gr.Button("Create", scale=1, elem_id="create-dataset")
    gr.Markdown("**Add images:** drop pictures, their `.txt` captions or a `.zip` of both below.")
    c["files"] = gr.File(label="Drop images, .txt captions or a .zip here", file_count="multiple",
                         elem_id="dataset-upload", height=130, show_label=False)
    with gr.Accordion("Import a folder from this computer", open=False):
        c["folder"] = gr.Textbox(label="Folder path", placeholder="/home/me/pictures/dog")
        c["import_btn"] = gr.Button("Copy into a new dataset")
    with gr.Accordion("Trigger word and captions", open=True):
        c["trigger"] = gr.Textbox(label="Trigger word", placeholder="sks dog", elem_id="dataset-trigger",
                                  info="A rare word that will call up your concept. Saved with the dataset; "
                                       "training puts it in front of each caption that lacks it.")
        with gr.Row():
            c["trigger_btn"] = gr.Button("Save trigger", elem_id="save-trigger")
            c["bake_btn"] = gr.Button("Also write it into the captions", size="sm")
        with gr.Row():
            c["find"] = gr.Textbox(label="Find")
            c["replace"] = gr.Textbox(label="Replace with")
        c["replace_btn"] = gr.Button("Replace in every caption")
    c["status"] = gr.Markdown(elem_id="dataset-status")
    c["summary"] = gr.Markdown(elem_id="dataset-summary")
    c["resolution"] = gr.Number(native_resolution(settings.base_model), label="Bucket resolution", precision=0,
                                info="The training resolution (set in the Train tab) the buckets are for.")
    c["buckets"] = gr.Dataframe(headers=["bucket (w x h)", "images"], label="Aspect buckets", interactive=False)
    c["skipped"] = gr.Dataframe(headers=["file", "reason"], label="Skipped files", interactive=False)


def _gallery_column(c: dict) -> None:
    c["gallery"] = gr.Gallery(label="Images and captions as trained (click one to edit its caption)", columns=4,
                              height=420, allow_preview=False, object_fit="contain", elem_id="dataset-gallery")
    with gr.Row(equal_height=False):
        c["preview"] = gr.Image(label="Selected", interactive=False, height=220, scale=1, elem_id="caption-preview")
        with gr.Column(scale=2):
            c["caption"] = gr.Textbox(label="Caption", lines=4, elem_id="caption-box",
                                      info="Describe what should NOT become part of the concept (pose, background, "
                                           "clothing); saved when you press Save or leave the box.")
            with gr.Row():
                c["save_btn"] = gr.Button("Save", variant="primary", elem_id="save-caption")
                c["next_btn"] = gr.Button("Save & next", elem_id="save-next")
                c["remove_btn"] = gr.Button("Remove image", variant="stop")
    c["selected"] = gr.State(None)


def _caption_model_section(settings: AppSettings, c: dict) -> None:
    with gr.Accordion("Caption with a model", open=False, elem_id="caption-model-section"):
        gr.Markdown("A local caption model writes a caption for each image. **Preview** shows what the first "
                    f"{PREVIEW_IMAGES} would get without writing; **Write captions** writes them (each file at once, "
                    "so a stop leaves whole captions). Captions are written without the trigger, as typed ones are: "
                    "training puts it in front.")
        c["cap_model"] = gr.Textbox(label="Caption model folder", elem_id="caption-model",
                                    placeholder="/home/me/models/Florence-2-base",
                                    info="Florence-2 (florence-community), BLIP, Qwen2.5/3-VL or a WD v3 tagger "
                                         "folder, in a folder this app may read (whoever runs it allows one with "
                                         "--allow-import DIR); or, where this machine reaches the model hub, a hub "
                                         "name.")
        with gr.Row():
            c["cap_mode"] = gr.Radio(CAPTION_MODE_CHOICES, value="auto", label="Mode", scale=2)
            c["cap_overwrite"] = gr.Checkbox(False, label="Replace existing captions", scale=1,
                                             info="Off: images with a caption keep it.")
        with gr.Row():
            c["cap_prefix"] = gr.Textbox(label="Prefix", placeholder="photo", info="put in front, joined with ', '")
            c["cap_suffix"] = gr.Textbox(label="Suffix", info="put after, joined with ', '")
        gr.Markdown(caption_help(), elem_classes=["caption-memory"])
        with gr.Row():
            c["cap_preview_btn"] = gr.Button("Preview", elem_id="caption-preview-btn")
            c["cap_write_btn"] = gr.Button("Write captions", variant="primary", elem_id="caption-write-btn")
        c["cap_status"] = gr.Markdown(elem_id="caption-status")
        c["cap_table"] = gr.Dataframe(headers=PREVIEW_HEADERS, label="Preview (nothing written)", interactive=False,
                                      wrap=True, column_widths=["18%", "30%", "32%", "20%"],
                                      elem_id="caption-preview-table")


def build(settings: AppSettings, demo: gr.Blocks) -> tuple[gr.Dropdown, gr.Number]:
    """Lay out the tab inside the current Blocks; returns the dataset picker and the bucket resolution (the Train
    tab follows the one and sets the other)."""
    c: dict = {}
    gr.Markdown(HELP.format(data_dir=settings.data_dir))
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=320):
            _left_column(settings, c)
        with gr.Column(scale=2):
            _gallery_column(c)
            _caption_model_section(settings, c)
    _wire_datasets(settings, c)
    _wire_captions(settings, c)
    _wire_caption_model(settings, c)
    views = [c["picker"], c["gallery"], c["summary"], c["buckets"], c["skipped"], c["trigger"]]
    demo.load(guarded(lambda name, res: on_page_load(settings, name, res), views, c["summary"]),
              [c["picker"], c["resolution"]], views)
    return c["picker"], c["resolution"]


def on_page_load(settings: AppSettings, name: str | None, resolution: int):
    """A new browser tab sees datasets made in other tabs or before a restart."""
    choices = D.list_datasets(settings.data_dir)
    name = name if name in choices else (choices[0] if choices else None)
    return (gr.update(choices=choices, value=name), *refresh(settings, name, resolution),
            trigger_value(settings, name))


# ----------------------------------------------------------------------------------------------------------------
# wiring

def _views(c: dict) -> list:
    return [c["gallery"], c["summary"], c["buckets"], c["skipped"]]


def _refresher(settings: AppSettings, c: dict):
    return guarded(lambda name, res: refresh(settings, name, res), _views(c), c["summary"])


def _wire_datasets(settings: AppSettings, c: dict) -> None:
    s, views, on_refresh = settings, _views(c), _refresher(settings, c)
    picked = [c["picker"], c["status"]]

    def after_create(new_name):
        name, choices, text = create(s, new_name)
        return gr.update(choices=choices, value=name), text

    def after_import(source, new_name):
        name, choices, text = import_folder(s, source, new_name)
        return gr.update(choices=choices, value=name), text

    c["create_btn"].click(guarded(after_create, picked, c["status"]), [c["new_name"]], picked)
    c["new_name"].submit(guarded(after_create, picked, c["status"]), [c["new_name"]], picked)
    c["import_btn"].click(guarded(after_import, picked, c["status"]), [c["folder"], c["new_name"]], picked)
    c["picker"].change(on_refresh, [c["picker"], c["resolution"]], views).then(
        lambda name: trigger_value(s, name), [c["picker"]], [c["trigger"]])
    c["resolution"].change(on_refresh, [c["picker"], c["resolution"]], views, trigger_mode="always_last")
    uploaded = c["files"].upload(guarded(lambda name, files: upload(s, name, files), [c["status"]], c["status"]),
                                 [c["picker"], c["files"]], [c["status"]])
    uploaded.then(lambda: None, None, [c["files"]]).then(on_refresh, [c["picker"], c["resolution"]], views)
    save_trigger = guarded(lambda name, t: set_trigger(s, name, t), [c["status"]], c["status"])
    write_trigger = guarded(lambda name, t: apply_trigger(s, name, t), [c["status"]], c["status"])
    for event, handler in ((c["trigger_btn"].click, save_trigger), (c["trigger"].submit, save_trigger),
                           (c["bake_btn"].click, write_trigger)):
        event(handler, [c["picker"], c["trigger"]], [c["status"]]).then(
            on_refresh, [c["picker"], c["resolution"]], views)
    c["replace_btn"].click(guarded(lambda name, f, r: find_replace(s, name, f, r), [c["status"]], c["status"]),
                           [c["picker"], c["find"], c["replace"]], [c["status"]]).then(
        on_refresh, [c["picker"], c["resolution"]], views)


def _wire_captions(settings: AppSettings, c: dict) -> None:
    s, views, on_refresh = settings, _views(c), _refresher(settings, c)
    editor = [c["selected"], c["preview"], c["caption"]]

    def on_select(name, evt: gr.SelectData):  # not wrapped: Gradio finds SelectData by this signature
        try:
            return select(s, name, evt.index)
        except (UserError, OSError) as e:
            gr.Warning(user_message(e))
            return gr.skip(), gr.skip(), gr.skip()

    c["gallery"].select(on_select, [c["picker"]], editor)

    def save_and_next(name, item, text):
        msg = save_caption(s, name, item, text)
        return (msg, *select(s, name, next_index(s, name, item)))

    save = guarded(lambda name, item, text: save_caption(s, name, item, text), [c["status"]], c["status"])
    for trigger in (c["save_btn"].click, c["caption"].submit, c["caption"].blur):
        trigger(save, [c["picker"], c["selected"], c["caption"]], [c["status"]]).then(
            on_refresh, [c["picker"], c["resolution"]], views)  # the summary's counts follow the edit
    c["next_btn"].click(guarded(save_and_next, [c["status"], *editor], c["status"]),
                        [c["picker"], c["selected"], c["caption"]], [c["status"], *editor]).then(
        on_refresh, [c["picker"], c["resolution"]], views)
    c["remove_btn"].click(guarded(lambda name, item: remove(s, name, item), [c["status"]], c["status"]),
                          [c["picker"], c["selected"]], [c["status"]]).then(
        lambda: (None, None, ""), None, editor).then(on_refresh, [c["picker"], c["resolution"]], views)


def _wire_caption_model(settings: AppSettings, c: dict) -> None:
    """Preview and write; after a write the gallery, summary and editor show the new captions. Both share the
    Generate tab's concurrency group: one job on the device at a time."""
    s, views, on_refresh = settings, _views(c), _refresher(settings, c)
    fields = [c["picker"], c["cap_model"], c["cap_mode"], c["cap_prefix"], c["cap_suffix"], c["cap_overwrite"]]
    editor = [c["selected"], c["preview"], c["caption"]]

    # gr.Progress comes first: Gradio finds it only among the positional parameters
    def on_preview(progress=gr.Progress(), *values):
        rows, text = preview_caption_rows(s, *values, progress=progress)
        return rows, text

    def on_write(progress=gr.Progress(), *values):
        return write_captions(s, *values, progress=progress)

    preview_out = [c["cap_table"], c["cap_status"]]
    c["cap_preview_btn"].click(guarded(on_preview, preview_out, c["cap_status"]), fields, preview_out,
                               concurrency_limit=1, concurrency_id="device")
    c["cap_write_btn"].click(guarded(on_write, [c["cap_status"]], c["cap_status"]), fields, [c["cap_status"]],
                             concurrency_limit=1, concurrency_id="device").then(
        on_refresh, [c["picker"], c["resolution"]], views).then(
        guarded(lambda name, item: reselect(s, name, item), editor, c["status"]), [c["picker"], c["selected"]],
        editor)
