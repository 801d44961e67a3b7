"""Dataset tab handlers, called directly (no server): uploads, captions, bulk edits, summary, persistence."""
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from app import datasets as D
from app.files import UploadError
from app.settings import AppSettings
from app.tabs import dataset as tab


@pytest.fixture
def settings(tmp_path) -> AppSettings:
    return AppSettings(data_dir=tmp_path / "datasets", runs_dir=tmp_path / "runs", adapters_dir=tmp_path / "ad")


def png(path: Path, size=(48, 32), colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def test_create_then_upload_images_with_their_captions(settings, tmp_path):
    name, choices, text = tab.create(settings, "My Dog!")
    assert name == "My_Dog" and choices == [name] and "named **My_Dog**" in text
    up = tmp_path / "upload"
    files = [png(up / "a.png"), png(up / "b.jpg"), up / "a.txt", up / "readme.md"]
    (up / "a.txt").write_text("a red box")
    (up / "readme.md").write_text("hi")
    text = tab.upload(settings, name, [str(f) for f in files])
    assert text.startswith("Added 2 image(s), 1 caption(s), skipped 1: readme.md")
    gallery = tab.gallery_value(settings, name)
    assert [(Path(p).name, c) for p, c in gallery] == [("a.png", "a red box"), ("b.jpg", "(no caption)")]


def test_uploads_never_overwrite_and_keep_captions_paired(settings, tmp_path):
    folder = D.create_dataset(settings.data_dir, "d")
    png(folder / "a.png")
    (folder / "a.txt").write_text("original")
    up = tmp_path / "up"
    png(up / "a.png", colour=(0, 0, 255))
    (up / "a.txt").write_text("the new one")
    report = D.add_uploads(folder, [up / "a.png", up / "a.txt"])
    assert report.added == ["a-2.png"]
    assert (folder / "a.txt").read_text() == "original"
    assert (folder / "a-2.txt").read_text().strip() == "the new one"


def test_a_zip_with_captions_is_extracted_safely(settings, tmp_path):
    folder = D.create_dataset(settings.data_dir, "z")
    src = png(tmp_path / "src" / "cat.png")
    archive = tmp_path / "set.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(src, "../../../outside/cat.png")
        z.writestr("cat.txt", "a cat")
        z.writestr("__MACOSX/._cat.png", b"junk")
        z.writestr("._cat.png", b"junk")
        z.write(src, "b/cat.png")  # same name in another folder: kept in that folder with its own caption
        z.writestr("b/cat.txt", "another cat")
    report = D.add_uploads(folder, [archive])
    assert sorted(report.added) == ["b/cat.png", "outside/cat.png"] and report.captions == ["cat.txt"]
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "b/cat.png", "b/cat.txt", "outside/cat.png"]
    assert (folder / "b" / "cat.txt").read_text().strip() == "another cat"
    assert report.skipped == [("cat.txt", "no image with the same name; upload the image with its caption")]
    assert not (tmp_path / "outside").exists()


def test_caption_edits_are_saved_at_once_and_survive_a_restart(settings, tmp_path):
    folder = D.create_dataset(settings.data_dir, "d")
    png(folder / "x.png")
    png(folder / "y.png")
    item, preview, caption = tab.select(settings, "d", 1)
    assert item == "y.png" and Path(preview).name == "y.png" and caption == ""
    assert tab.save_caption(settings, "d", item, "  a blue box \n") == "Saved the caption of y.png."
    assert (folder / "y.txt").read_text() == "a blue box\n"
    # a fresh "app" (new settings object, new listing) sees the edit
    fresh = AppSettings(data_dir=settings.data_dir)
    assert tab.select(fresh, "d", 1)[2] == "a blue box"
    assert tab.next_index(fresh, "d", "y.png") == 0
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temp files left


def test_caption_names_cannot_leave_the_dataset(settings, tmp_path):
    folder = D.create_dataset(settings.data_dir, "d")
    png(folder / "x.png")
    png(tmp_path / "secret.png")
    with pytest.raises(UploadError, match="not an image of this dataset"):
        D.save_caption(folder, "../../secret.png", "pwned")
    assert not (tmp_path / "secret.txt").exists()
    with pytest.raises(UploadError):
        D.dataset_dir(settings.data_dir, "../..")


def test_trigger_and_find_replace_edit_every_caption(settings):
    folder = D.create_dataset(settings.data_dir, "d")
    for n, cap in [("a", "a red dog"), ("b", "zqx, a red cat"), ("c", None)]:
        png(folder / f"{n}.png")
        if cap:
            (folder / f"{n}.txt").write_text(cap)
    assert tab.apply_trigger(settings, "d", "zqx") == "Wrote 'zqx' into 2 caption(s) that lacked it."
    assert [i.caption for i in D.load_items(folder)] == ["zqx, a red dog", "zqx, a red cat", "zqx"]
    assert tab.find_replace(settings, "d", "red", "blue") == "Replaced 'red' in 2 caption(s)."
    assert [i.caption for i in D.load_items(folder)] == ["zqx, a blue dog", "zqx, a blue cat", "zqx"]
    with pytest.raises(UploadError, match="trigger word"):
        D.apply_trigger(folder, " ")


def test_summary_counts_buckets_and_skipped_files(settings):
    folder = D.create_dataset(settings.data_dir, "d")
    for i in range(3):
        png(folder / f"wide{i}.png", size=(128, 64))
        (folder / f"wide{i}.txt").write_text("wide")
    png(folder / "tall.png", size=(64, 128))
    (folder / "broken.png").write_bytes(b"not an image")
    gallery, text, buckets, skipped = tab.refresh(settings, "d", 128)
    assert len(gallery) == 5  # the broken file is still listed so it can be removed
    assert "**4 images**" in text and "3 captioned, 1 without caption" in text
    assert sum(n for _, n in buckets) == 4 and len(buckets) == 2
    assert [row[0] for row in skipped] == ["broken.png"] and skipped[0][1]


def test_remove_image_takes_its_caption(settings):
    folder = D.create_dataset(settings.data_dir, "d")
    png(folder / "x.png")
    (folder / "x.txt").write_text("x")
    assert tab.remove(settings, "d", "x.png") == "Removed x.png and its caption."
    assert list(folder.iterdir()) == []


def test_import_folder_copies_images_captions_and_repeat_folders(settings, tmp_path):
    src = tmp_path / "photos"
    png(src / "10_dog" / "d.png")
    (src / "10_dog" / "d.txt").write_text("a dog")
    png(src / "e.webp")
    (src / "notes.docx").write_text("x")
    name, choices, text = tab.import_folder(replace(settings, import_dirs=(src,)), str(src))
    assert name == "photos" and choices == ["photos"]
    assert "Added 2 image(s), 1 caption(s), skipped 1" in text
    assert [(i.name, i.caption) for i in D.load_items(settings.data_dir / name)] == [
        ("10_dog/d.png", "a dog"), ("e.webp", "")]
    with pytest.raises(UploadError, match="is not a folder"):
        tab.import_folder(settings, str(tmp_path / "missing"))


def test_upload_without_a_dataset_says_what_to_do(settings, tmp_path):
    with pytest.raises(UploadError, match="Create or pick a dataset first"):
        tab.upload(settings, None, [str(png(tmp_path / "a.png"))])


def test_a_dataset_name_with_path_parts_says_what_it_became(settings):
    name, _, text = tab.create(settings, "my dog/../../etc")
    assert name == "my_dog_etc" and (settings.data_dir / name).is_dir() and f"named **{name}**" in text
    assert not (settings.data_dir.parent / "etc").exists()


def test_broken_uploads_are_skipped_with_the_reason_not_added(settings, tmp_path):
    folder = D.create_dataset(settings.data_dir, "d")
    up = tmp_path / "up"
    good = png(up / "good.png")
    (up / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (up / "empty.jpg").write_bytes(b"")
    text = tab.upload(settings, "d", [str(good), str(up / "broken.png"), str(up / "empty.jpg")])
    assert text.startswith("Added 1 image(s), skipped 2: broken.png (") and "empty.jpg (empty file" in text
    assert sorted(p.name for p in folder.iterdir()) == ["good.png"]


def test_the_trigger_is_saved_with_the_dataset_and_shown_as_trained(settings):
    from trainer import TrainConfig, scan_dataset
    folder = D.create_dataset(settings.data_dir, "d")
    png(folder / "a.png")
    (folder / "a.txt").write_text("a red dog")
    png(folder / "b.png")
    (folder / "b.txt").write_text("a zqx cat")
    assert "**zqx**" in tab.set_trigger(settings, "d", " zqx ")
    assert tab.trigger_value(settings, "d") == "zqx"
    assert [c for _, c in tab.gallery_value(settings, "d")] == ["zqx, a red dog", "a zqx cat"]
    assert tab.select(settings, "d", 0)[2] == "a red dog", "the editor holds the caption file's own text"
    ds = TrainConfig().dataset
    ds.path = str(folder)
    assert scan_dataset(ds).trigger == "zqx", "the trainer reads the dataset's trigger from the same place"
    assert "Trigger **zqx**" in tab.summary_values(settings, "d", 64)[0]


def test_the_summary_counts_follow_a_caption_edit(settings):
    folder = D.create_dataset(settings.data_dir, "d")
    png(folder / "a.png")
    assert "0 captioned, 1 without caption" in tab.summary_values(settings, "d", 64)[0]
    tab.save_caption(settings, "d", "a.png", "a red box")
    assert "1 captioned, 0 without caption" in tab.summary_values(settings, "d", 64)[0]


# issue 23 -----------------------------------------------------------------------------------------------------------

def test_importing_the_demo_folder_keeps_its_trigger(settings):
    """Item 5: the dataset's own settings file came along as 'junk' and the imported dataset lost its trigger."""
    from app.settings import EXAMPLES_DIR
    name, _, text = tab.import_folder(settings, str(EXAMPLES_DIR / "demo-concept"), "demo")
    assert "skipped" not in text, text
    assert "trigger **zqx**" in text
    assert tab.trigger_value(settings, name) == "zqx"
    assert all(caption.startswith("zqx") or " zqx" in caption for _, caption in tab.gallery_value(settings, name))


def test_a_damaged_dataset_settings_file_is_not_copied(settings, tmp_path):
    """Item 5: the file is read and written anew, never copied blindly; a damaged one is reported, not kept."""
    src = tmp_path / "photos"
    png(src / "a.png")
    (src / "loradesk-dataset.toml").write_bytes(b'trigger = "zqx\n\xff\x00 [[[')
    settings = replace(settings, import_dirs=(src,))
    name, _, text = tab.import_folder(settings, str(src))
    assert "loradesk-dataset.toml (damaged" in text
    assert not (settings.data_dir / name / "loradesk-dataset.toml").exists()
    assert tab.trigger_value(settings, name) == ""
    (src / "loradesk-dataset.toml").write_text('trigger = "sks dog"\nsomething = [1, 2]\n')
    name, _, text = tab.import_folder(settings, str(src), "again")
    assert tab.trigger_value(settings, name) == "sks dog"
    assert "something" not in (settings.data_dir / name / "loradesk-dataset.toml").read_text()


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-8-sig"])
def test_a_caption_saved_as_utf16_or_with_a_bom_shows_as_written(settings, tmp_path, encoding):
    """Item 15: UTF-16 captions with a BOM were read as Windows-1252 (BOM and NUL bytes kept), and refused on
    upload as 'not a text file'."""
    import codecs
    bom = {"utf-16-le": codecs.BOM_UTF16_LE, "utf-16-be": codecs.BOM_UTF16_BE}.get(encoding, b"")
    folder = D.create_dataset(settings.data_dir, "d")
    png(folder / "a.png")
    (folder / "a.txt").write_bytes(bom + "a café, smiling".encode(encoding))
    assert tab.gallery_value(settings, "d") == [(str(folder / "a.png"), "a café, smiling")]
    assert tab.select(settings, "d", 0)[2] == "a café, smiling"
    assert "not UTF-8" not in tab.summary_values(settings, "d")[0]
    up = tmp_path / "up"
    png(up / "b.png")
    (up / "b.txt").write_bytes(bom + "a blue box".encode(encoding))
    assert tab.upload(settings, "d", [str(up / "b.png"), str(up / "b.txt")]).startswith("Added 1 image(s), 1 caption")
    assert (folder / "b.txt").read_text(encoding="utf-8") == "a blue box\n"
