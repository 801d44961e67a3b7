"""Dataset tab: drop images (or a zip, or a folder path), caption them, see what the trainer will see."""
from __future__ import annotations


import gradio as gr

from .. import datasets as D
from ..files import UploadError
from ..settings import AppSettings

HELP = ("Each dataset is a folder under **{data_dir}/** with your images and a same-name `.txt` caption for each. "
        "Every edit is saved at once, so closing the browser loses nothing. 10 to 30 varied images of one subject "
        "or style are plenty; subfolders named like `10_dog` repeat their images 10 times per epoch.")


# ----------------------------------------------------------------------------------------------------------------
# handlers: plain functions of plain values, each returning the values of its outputs

def gallery_value(settings: AppSettings, name: str | None) -> list[tuple[str, str]]:
    if not name:
        return []
    return [(str(i.path), i.caption or "(no caption)") for i in D.load_items(D.dataset_dir(settings.data_dir, name))]


def summary_values(settings: AppSettings, name: str | None, resolution: int = 512) -> tuple[str, list, list]:
    if not name:
        return "Pick or create a dataset.", [], []
    s = D.summarize(D.dataset_dir(settings.data_dir, name), max(32, int(resolution or 512)))
    return s.text, s.buckets, s.skipped


def refresh(settings: AppSettings, name: str | None, resolution: int = 512):
    """gallery, summary text, buckets, skipped."""
    text, buckets, skipped = summary_values(settings, name, resolution)
    return gallery_value(settings, name), text, buckets, skipped


def create(settings: AppSettings, new_name: str):
    """Create (or open) a dataset; returns its name and the dropdown choices."""
    folder = D.create_dataset(settings.data_dir, new_name)
    return folder.name, D.list_datasets(settings.data_dir)


def upload(settings: AppSettings, name: str | None, files: list) -> str:
    if not files:
        return "Nothing uploaded."
    if not name:
        raise UploadError("Create or pick a dataset first (top left), then drop the images again.")
    return D.add_uploads(D.dataset_dir(settings.data_dir, name), files).text()


def import_folder(settings: AppSettings, source: str, new_name: str = ""):
    """Copy a folder in as a new dataset; returns its name, the dropdown choices and a report."""
    folder, report = D.import_folder(settings.data_dir, source, new_name)
    return folder.name, D.list_datasets(settings.data_dir), report.text()


def select(settings: AppSettings, name: str | None, index: int | None) -> tuple[str | None, str | None, str]:
    """The picked image: (its name, its path for the preview, its caption)."""
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


def apply_trigger(settings: AppSettings, name: str | None, trigger: str) -> str:
    n = D.apply_trigger(D.dataset_dir(settings.data_dir, name), trigger)
    return f"Put '{trigger.strip()}' in front of {n} caption(s)."


def find_replace(settings: AppSettings, name: str | None, find: str, replace: str) -> str:
    n = D.find_replace(D.dataset_dir(settings.data_dir, name), find, replace)
    return f"Replaced '{find}' in {n} caption(s)."


def remove(settings: AppSettings, name: str | None, item: str | None) -> str:
    if not item:
        return "Click an image in the gallery first."
    D.remove_image(D.dataset_dir(settings.data_dir, name), item)
    return f"Removed {item} and its caption."


# ----------------------------------------------------------------------------------------------------------------
# layout

def _guard(fn):
    """Show a user error (bad upload, missing dataset) as a message instead of a stack trace."""
    def wrapper(*args):
        try:
            return fn(*args)
        except (UploadError, ValueError, OSError) as e:
            raise gr.Error(str(e)) from None
    return wrapper


def build(settings: AppSettings, demo: gr.Blocks) -> tuple[gr.Dropdown, gr.Number]:
    """Lay out the tab inside the current Blocks; returns the dataset picker and the bucket resolution (the Train
    tab follows the one and sets the other)."""
    datasets = D.list_datasets(settings.data_dir)
    gr.Markdown(HELP.format(data_dir=settings.data_dir))
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=320):
            picker = gr.Dropdown(datasets, value=datasets[0] if datasets else None, label="Dataset",
                                 elem_id="dataset-picker", interactive=True)
            with gr.Row():
                new_name = gr.Textbox(label="New dataset", placeholder="my-dog", scale=3, elem_id="new-dataset")
                create_btn = gr.Button("Create", scale=1, elem_id="create-dataset")
            gr.Markdown("**Add images:** drop pictures, their `.txt` captions or a `.zip` of both below.")
            files = gr.File(label="Drop images, .txt captions or a .zip here", file_count="multiple",
                            elem_id="dataset-upload", height=130, show_label=False)
            with gr.Accordion("Import a folder from this computer", open=False):
                folder = gr.Textbox(label="Folder path", placeholder="/home/me/pictures/dog")
                import_btn = gr.Button("Copy into a new dataset")
            with gr.Accordion("Edit all captions", open=False):
                trigger = gr.Textbox(label="Trigger word", placeholder="sks dog",
                                     info="A rare word that will call up your concept; put in front of every caption.")
                trigger_btn = gr.Button("Add to every caption")
                with gr.Row():
                    find = gr.Textbox(label="Find")
                    replace = gr.Textbox(label="Replace with")
                replace_btn = gr.Button("Replace in every caption")
            status = gr.Markdown(elem_id="dataset-status")
            summary = gr.Markdown()
            resolution = gr.Number(512, label="Bucket resolution", precision=0,
                                   info="The training resolution (set in the Train tab) the buckets are for.")
            buckets = gr.Dataframe(headers=["bucket (w x h)", "images"], label="Aspect buckets", interactive=False)
            skipped = gr.Dataframe(headers=["file", "reason"], label="Skipped files", interactive=False)
        with gr.Column(scale=2):
            gallery = gr.Gallery(label="Images and captions (click one to edit its caption)", columns=4,
                                 height=420, allow_preview=False, object_fit="cover", elem_id="dataset-gallery")
            with gr.Row(equal_height=False):
                preview = gr.Image(label="Selected", interactive=False, height=220, scale=1, elem_id="caption-preview")
                with gr.Column(scale=2):
                    caption = gr.Textbox(label="Caption", lines=4, elem_id="caption-box",
                                         info="Describe what should NOT become part of the concept (pose, "
                                              "background, clothing); saved when you press Save or leave the box.")
                    with gr.Row():
                        save_btn = gr.Button("Save", variant="primary", elem_id="save-caption")
                        next_btn = gr.Button("Save & next", elem_id="save-next")
                        remove_btn = gr.Button("Remove image", variant="stop")
            selected = gr.State(None)
    _wire(settings, locals())
    demo.load(_guard(lambda name, res: on_page_load(settings, name, res)), [picker, resolution],
              [picker, gallery, summary, buckets, skipped])
    return picker, resolution


def on_page_load(settings: AppSettings, name: str | None, resolution: int):
    """A new browser tab sees datasets made in other tabs or before a restart."""
    choices = D.list_datasets(settings.data_dir)
    name = name if name in choices else (choices[0] if choices else None)
    return (gr.update(choices=choices, value=name), *refresh(settings, name, resolution))


def _wire(settings: AppSettings, c: dict) -> None:
    s = settings
    views = [c["gallery"], c["summary"], c["buckets"], c["skipped"]]
    on_refresh = _guard(lambda name, res: refresh(s, name, res))

    def after_create(new_name):
        name, choices = create(s, new_name)
        return gr.update(choices=choices, value=name), f"Dataset **{name}** is ready: drop images on the left."

    def after_import(source, new_name):
        name, choices, text = import_folder(s, source, new_name)
        return gr.update(choices=choices, value=name), text

    c["create_btn"].click(_guard(after_create), [c["new_name"]], [c["picker"], c["status"]])
    c["new_name"].submit(_guard(after_create), [c["new_name"]], [c["picker"], c["status"]])
    c["import_btn"].click(_guard(after_import), [c["folder"], c["new_name"]], [c["picker"], c["status"]])
    c["picker"].change(on_refresh, [c["picker"], c["resolution"]], views)
    c["resolution"].change(on_refresh, [c["picker"], c["resolution"]], views, trigger_mode="always_last")

    uploaded = c["files"].upload(_guard(lambda name, files: upload(s, name, files)), [c["picker"], c["files"]],
                                 [c["status"]])
    uploaded.then(lambda: None, None, [c["files"]]).then(on_refresh, [c["picker"], c["resolution"]], views)

    def on_select(name, evt: gr.SelectData):  # not wrapped: Gradio finds SelectData by this signature
        try:
            return select(s, name, evt.index)
        except (UploadError, OSError) as e:
            raise gr.Error(str(e)) from None

    c["gallery"].select(on_select, [c["picker"]], [c["selected"], c["preview"], c["caption"]])

    def save_and_next(name, item, text):
        msg = save_caption(s, name, item, text)
        return (msg, *select(s, name, next_index(s, name, item)))

    save = _guard(lambda name, item, text: save_caption(s, name, item, text))
    for trigger in (c["save_btn"].click, c["caption"].submit, c["caption"].blur):
        trigger(save, [c["picker"], c["selected"], c["caption"]], [c["status"]]).then(
            _guard(lambda name: gallery_value(s, name)), [c["picker"]], [c["gallery"]])
    c["next_btn"].click(_guard(save_and_next), [c["picker"], c["selected"], c["caption"]],
                        [c["status"], c["selected"], c["preview"], c["caption"]]).then(
        _guard(lambda name: gallery_value(s, name)), [c["picker"]], [c["gallery"]])
    c["remove_btn"].click(_guard(lambda name, item: remove(s, name, item)), [c["picker"], c["selected"]],
                          [c["status"]]).then(lambda: (None, None, ""), None,
                                              [c["selected"], c["preview"], c["caption"]]).then(
        on_refresh, [c["picker"], c["resolution"]], views)
    c["trigger_btn"].click(_guard(lambda name, t: apply_trigger(s, name, t)), [c["picker"], c["trigger"]],
                           [c["status"]]).then(on_refresh, [c["picker"], c["resolution"]], views)
    c["replace_btn"].click(_guard(lambda name, f, r: find_replace(s, name, f, r)),
                           [c["picker"], c["find"], c["replace"]], [c["status"]]).then(
        on_refresh, [c["picker"], c["resolution"]], views)
