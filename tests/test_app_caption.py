"""The Dataset tab's "Caption with a model" section (issue 27 item 6), its handlers called directly (no server), with
the tiny ONNX tagger and tiny BLIP that tests/test_caption.py builds (random weights: structure and rules, not words).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from app import device
from app.settings import AppSettings
from app.tabs import dataset as tab
from test_caption import make_dataset, write_tagger, write_tiny_blip
from trainer import CaptionError, UserError, set_dataset_trigger

TAGGED = "red background, simple background, ^_^"  # what the tiny tagger writes for a red image


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """The folder the app may read models from (--allow-import), holding the tiny tagger."""
    root = tmp_path_factory.mktemp("models")
    write_tagger(root / "tagger")
    return root


@pytest.fixture(scope="module")
def blip(models) -> Path:
    return write_tiny_blip(models / "blip")


@pytest.fixture
def settings(tmp_path, models) -> AppSettings:
    return AppSettings(data_dir=tmp_path / "datasets", runs_dir=tmp_path / "runs", adapters_dir=tmp_path / "ad",
                       import_dirs=(models,))


@pytest.fixture
def data(settings) -> Path:
    """datasets/d: red, blue, old (captioned 'kept caption'), broken (not an image), 10_sub/deep."""
    return make_dataset(settings.data_dir / "d")


@pytest.fixture(autouse=True)
def no_cached_model():
    device.release_models()
    yield
    device.release_models()
    assert not device.device_busy(), "the device lock is given back, whatever happened"


def files(folder: Path) -> list[tuple[str, int]]:
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_mtime_ns) for p in folder.rglob("*"))


def test_preview_writes_nothing(settings, data, models):
    before = files(data)
    rows, text = tab.preview_caption_rows(settings, "d", str(models / "tagger"))
    assert files(data) == before
    assert [r[0] for r in rows] == ["10_sub/deep.png", "blue.png", "red.png"]  # old.png keeps its caption
    assert rows[2] == ["red.png", TAGGED, TAGGED, ""]
    assert "nothing was written" in text
    assert "broken.png" in text and str(data) not in text  # named, without the server path


def test_write_keeps_existing_captions_and_refreshes_the_editor(settings, data, models):
    assert tab.reselect(settings, "d", "red.png")[2] == ""
    seen = []
    text = tab.write_captions(settings, "d", str(models / "tagger"), "tags", progress=lambda v, what: seen.append(v))
    assert text.startswith("Wrote 3 caption(s), kept 1 existing") and "skipped 1: broken.png (" in text
    assert (data / "red.txt").read_text(encoding="utf-8") == TAGGED + "\n"
    assert (data / "10_sub" / "deep.txt").is_file() and (data / "blue.txt").is_file()
    assert (data / "old.txt").read_text(encoding="utf-8") == "kept caption\n"
    assert not (data / "broken.txt").exists()
    assert seen[-1] == 1.0
    assert tab.reselect(settings, "d", "red.png") == ("red.png", str(data / "red.png"), TAGGED)
    gallery = dict((Path(p).name, c) for p, c in tab.gallery_value(settings, "d"))
    assert gallery["red.png"] == TAGGED and gallery["old.png"] == "kept caption"
    assert tab.write_captions(settings, "d", str(models / "tagger")).startswith("Wrote 0 caption(s), kept 4")
    text = tab.write_captions(settings, "d", str(models / "tagger"), prefix="zqx style", overwrite=True)
    assert text.startswith("Wrote 4 caption(s)")
    assert (data / "old.txt").read_text(encoding="utf-8") == f"zqx style, {TAGGED}\n"


def test_the_trigger_rule_applies_to_model_captions(settings, data, models):
    set_dataset_trigger(data, "zqx")
    rows, _ = tab.preview_caption_rows(settings, "d", str(models / "tagger"))
    assert rows[2][:3] == ["red.png", TAGGED, f"zqx, {TAGGED}"]
    text = tab.write_captions(settings, "d", str(models / "tagger"))
    assert "Training puts the trigger **zqx** in front" in text
    assert (data / "red.txt").read_text(encoding="utf-8") == TAGGED + "\n", "written as a typed caption is"
    gallery = dict((Path(p).name, c) for p, c in tab.gallery_value(settings, "d"))
    assert gallery["red.png"] == f"zqx, {TAGGED}"


def test_the_model_stays_loaded_from_preview_to_write(settings, data, models, monkeypatch):
    loads = []
    real = tab.load_captioner
    monkeypatch.setattr(tab, "load_captioner", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    tab.preview_caption_rows(settings, "d", str(models / "tagger"))
    tab.write_captions(settings, "d", f" {models / 'tagger'} ", "tags")
    assert len(loads) == 1
    (settings.data_dir / "e").mkdir()
    tab.preview_caption_rows(settings, "e", str(models / "tagger"))  # another dataset, same model
    assert len(loads) == 1
    device.release_models()  # what a training start does
    tab.preview_caption_rows(settings, "d", str(models / "tagger"))
    assert len(loads) == 2


def test_while_a_run_trains_captions_are_made_on_the_cpu(settings, data, models, monkeypatch):
    monkeypatch.setattr(tab, "active_run", lambda runs_dir: type("Run", (), {"name": "dog-lora"})())
    text = tab.write_captions(settings, "d", str(models / "tagger"))
    assert "Wrote 3 caption(s) on the CPU (run dog-lora is training on the device)" in text
    assert [key[2] for key in device._generators] == ["cpu"]


def test_while_the_queue_runs_captions_are_made_on_the_cpu(settings, data, models, monkeypatch):
    """The queue's runner may start a training at any moment: the captioner keeps off the device meanwhile."""
    monkeypatch.setattr(tab, "runner_active", lambda runs_dir: True)
    text = tab.write_captions(settings, "d", str(models / "tagger"))
    assert "on the CPU (the queue may start a training on the device)" in text
    assert [key[2] for key in device._generators] == ["cpu"]


def one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text.strip() and "Traceback" not in text
    return text


@pytest.mark.parametrize("model, words", [
    ("", "give the caption model's folder"),
    ("empty", "neither config.json"),
    ("nobody/no-such-captioner", "no-such-captioner"),  # a hub name; offline in tests
])
def test_a_bad_model_is_one_line_and_writes_nothing(settings, data, models, model, words):
    (models / "empty").mkdir(exist_ok=True)
    model = str(models / model) if model == "empty" else model
    before = files(data)
    for handler in (tab.preview_caption_rows, tab.write_captions):
        with pytest.raises(UserError) as e:
            handler(settings, "d", model)
        assert words in one_line(e.value)
    assert files(data) == before


def test_a_model_outside_the_allowed_folders_is_not_loaded(settings, data, tmp_path, monkeypatch):
    outside = write_tagger(tmp_path / "elsewhere" / "tagger")
    monkeypatch.setattr(tab, "load_captioner", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(UserError, match="not in a folder this app may read.*--allow-import") as e:
        tab.write_captions(settings, "d", str(outside))
    one_line(e.value)
    assert not (data / "red.txt").exists()


def test_the_wrong_mode_and_the_guarded_handler(settings, data, models):
    with pytest.raises(CaptionError, match="--mode sentence needs Florence-2") as e:
        tab.preview_caption_rows(settings, "d", str(models / "tagger"), "sentence")
    one_line(e.value)
    with pytest.raises(UserError, match="caption mode 'words'"):
        tab.write_captions(settings, "d", str(models / "tagger"), "words")
    # as wired: the message goes to the status line, nothing else changes
    guarded = tab.guarded(lambda: tab.write_captions(settings, "d", str(models / "tagger"), "sentence"), ["status"],
                          "status")
    assert guarded().startswith("⚠ --mode sentence needs")
    assert not (data / "red.txt").exists()


def test_a_dataset_with_every_caption_says_so(settings, data, models):
    for name in ("red", "blue", "10_sub/deep"):
        (data / f"{name}.txt").write_text("typed\n", encoding="utf-8")
    rows, text = tab.preview_caption_rows(settings, "d", str(models / "tagger"))
    assert rows == [] and "Every image has a caption" in text


def test_blip_preview_then_write_with_a_prefix(settings, data, blip):
    rows, _ = tab.preview_caption_rows(settings, "d", str(blip), "sentence", prefix="photo")
    assert len(rows) == 3 and all(r[1].startswith("photo, ") and len(r[1]) > len("photo, ") for r in rows)
    text = tab.write_captions(settings, "d", str(blip), "sentence", prefix="photo")
    assert text.startswith("Wrote 3 caption(s)")
    written = {r[0]: r[1] for r in rows}
    assert (data / "red.txt").read_text(encoding="utf-8") == written["red.png"] + "\n"  # the preview's caption
    with pytest.raises(CaptionError, match="--mode tags needs a WD tagger"):
        tab.preview_caption_rows(settings, "d", str(blip), "tags", overwrite=True)
