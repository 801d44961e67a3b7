"""Dataset tab: drop images (or a zip, or a folder path), caption them, see what the trainer will see."""
from __future__ import annotations

import gradio as gr

from trainer import UserError, dataset_trigger, native_resolution

from .. import datasets as D
from ..errors import guarded, user_message
from ..files import UploadError, safe_dirname
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
    _wire_datasets(settings, c)
    _wire_captions(settings, c)
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
