"""The dataset pipeline: scanning, captions, image repair, buckets, batch plans, pixels and the latent cache.

Every image is built with PIL in tmp_path; no model is loaded.
"""
from __future__ import annotations

import io
import math
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from trainer.config import DatasetSection
from trainer.data import (IMAGE_EXTENSIONS, BatchPlan, DatasetError, ImageItem, ImageLoadError, LatentCache,
                          bucket_stats, build_caption, load_image, load_pixels, make_buckets, needs_fresh_pixels,
                          scan_dataset, to_rgb, uses_latent_cache)

REPO = Path(__file__).resolve().parents[1]


def ds_for(root: Path, **overrides) -> DatasetSection:
    ds = DatasetSection(path=str(root), resolution=32, bucket_step=8)
    for key, value in overrides.items():
        setattr(ds, key, value)
    return ds


def save(img: Image.Image, path: Path, fmt: str | None = None, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, **kwargs)
    return path


def solid(path: Path, size=(32, 32), colour=(200, 30, 30), caption: str | None = None) -> Path:
    save(Image.new("RGB", size, colour), path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def noise_bytes(fmt: str, size=(64, 48)) -> bytes:
    """An incompressible image, so that cutting the file in half cuts into the pixel data."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def names(paths) -> set[str]:
    return {Path(p).name for p in paths}


# ---------------------------------------------------------------------------------------------------------------
# captions, trigger, repeats

def test_captions_from_txt_and_caption_files_and_trigger_fallback_warns(tmp_path):
    solid(tmp_path / "a.png", caption="a red square, studio")
    solid(tmp_path / "b.jpg")
    (tmp_path / "b.caption").write_text("  blue\nbackground  \n", encoding="utf-8")
    solid(tmp_path / "c.png")
    solid(tmp_path / "d.png")
    (tmp_path / "d.txt").write_text("   \n", encoding="utf-8")  # an empty caption counts as none
    scan = scan_dataset(ds_for(tmp_path, trigger="zkx"))

    by_name = {item.path.name: item for item in scan.items}
    assert by_name["a.png"].caption == "a red square, studio" and by_name["a.png"].has_caption
    assert by_name["b.jpg"].caption == "blue, background" and by_name["b.jpg"].has_caption
    assert by_name["c.png"].caption == "" and not by_name["c.png"].has_caption
    assert not by_name["d.png"].has_caption
    rng = random.Random(0)
    ds = ds_for(tmp_path, trigger="zkx")
    assert build_caption(by_name["a.png"], ds, rng) == "zkx, a red square, studio"
    assert build_caption(by_name["c.png"], ds, rng) == "zkx"
    [warning] = [w for w in scan.warnings if "no caption" in w]
    assert warning.startswith("2 images have no caption and use the trigger word")
    assert "c.png" in warning and "d.png" in warning and "a.png" not in warning


def test_txt_wins_over_caption_and_non_utf8_captions_are_read(tmp_path):
    solid(tmp_path / "a.png", caption="from txt")
    (tmp_path / "a.caption").write_text("from caption", encoding="utf-8")
    solid(tmp_path / "b.png")
    (tmp_path / "b.txt").write_bytes("caf\xe9 au lait".encode("cp1252"))
    scan = scan_dataset(ds_for(tmp_path))
    by_name = {item.path.name: item for item in scan.items}
    assert by_name["a.png"].caption == "from txt"
    assert by_name["b.png"].caption == "caf\u00e9 au lait"
    assert any(".txt is used" in w and "a.png" in w for w in scan.warnings)
    assert any("not UTF-8" in w and "b.png" in w for w in scan.warnings)


def test_no_caption_and_no_trigger_warns_about_empty_captions(tmp_path):
    solid(tmp_path / "a.png")
    scan = scan_dataset(ds_for(tmp_path))
    assert any("no trigger word" in w and "a.png" in w for w in scan.warnings)


@pytest.mark.parametrize("caption, expected", [
    ("red square", "zkx, red square"),
    ("zkx, red square", "zkx, red square"),
    ("ZKX dog, red", "ZKX dog, red"),
    ("zkxfoo, red", "zkx, zkxfoo, red"),
    ("a zkx circle", "a zkx circle"),
    ("a foozkx circle", "zkx, a foozkx circle"),
    ("", "zkx"),
])
def test_trigger_is_prefixed_once(tmp_path, caption, expected):
    item = _item(tmp_path, caption)
    assert build_caption(item, ds_for(tmp_path, trigger="zkx"), random.Random(0)) == expected


def _item(tmp_path, caption):
    return ImageItem(tmp_path / "x.png", caption, bool(caption), 1, 32, 32, "data")


def test_repeats_come_from_n_name_folders_and_dataset_repeats(tmp_path):
    root = tmp_path / "set"
    solid(root / "10_cat" / "a.png", caption="cat")
    solid(root / "10_cat" / "nested" / "b.png", caption="cat, sitting")
    solid(root / "c.png", caption="dog")
    solid(root / "plain" / "d.png", caption="dog")
    solid(root / "0_off" / "e.png")
    scan = scan_dataset(ds_for(root, repeats=2))

    repeats = {item.path.name: (item.repeats, item.folder) for item in scan.items}
    assert repeats == {"a.png": (10, "10_cat"), "b.png": (10, "10_cat"), "c.png": (2, "set"), "d.png": (2, "plain")}
    assert scan.num_images == 24 and len(scan.items) == 4
    assert any("0_off" in w and "0 repeats" in w for w in scan.warnings)
    assert scan.tag_frequency() == {"10_cat": {"cat": 2, "sitting": 1}, "set": {"dog": 1}, "plain": {"dog": 1}}

    plan = BatchPlan(scan, ds_for(root, repeats=2), seed=1)
    assert plan.steps_per_epoch == 24
    counts = Counter(i for batch in plan.epoch(0) for i in batch)
    assert {scan.items[i].path.name: n for i, n in counts.items()} == {"a.png": 10, "b.png": 10, "c.png": 2,
                                                                     "d.png": 2}


def test_tag_frequency_counts_the_trigger_once_per_image(tmp_path):
    solid(tmp_path / "a.png", caption="zkx, red")
    solid(tmp_path / "b.png", caption="blue, red")
    scan = scan_dataset(ds_for(tmp_path, trigger="zkx"))
    assert scan.tag_frequency() == {tmp_path.name: {"zkx": 2, "red": 2, "blue": 1}}


def test_regularization_images_balance_the_training_images_and_never_get_the_trigger(tmp_path):
    train, reg = tmp_path / "train", tmp_path / "reg"
    solid(train / "3_cat" / "a.png", caption="cat on a sofa")
    solid(train / "b.png", caption="cat")
    for name in ("r1", "r2"):
        solid(reg / f"{name}.png", caption="a cat")
    solid(reg / "r3.png")  # no caption: warned about, still used
    ds = ds_for(train, trigger="zkx", regularization_path=str(reg))
    scan = scan_dataset(ds)

    assert [item.regularization for item in scan.items] == [False, False, True, True, True]
    assert scan.num_images == 4 and scan.num_reg_images == 3
    assert scan.tag_frequency() == {"3_cat": {"zkx": 1, "cat on a sofa": 1}, "train": {"zkx": 1, "cat": 1}}
    assert any(w.startswith("regularization folder:") and "r3.png" in w for w in scan.warnings)
    by_name = {item.path.name: item for item in scan.items}
    rng = random.Random(0)
    assert build_caption(by_name["a.png"], ds, rng) == "zkx, cat on a sofa"
    assert build_caption(by_name["r1.png"], ds, rng) == "a cat"

    plan = BatchPlan(scan, ds, seed=0)  # 4 training draws per epoch, so 4 regularization draws: r1 r2 r3 r1
    counts = Counter(scan.items[i].path.name for batch in plan.epoch(0) for i in batch)
    assert counts == {"a.png": 3, "b.png": 1, "r1.png": 2, "r2.png": 1, "r3.png": 1}
    assert plan.steps_per_epoch == 8


def test_more_regularization_images_than_training_images_warns_which_are_used(tmp_path):
    solid(tmp_path / "train" / "a.png", caption="cat")
    for i in range(3):
        solid(tmp_path / "reg" / f"r{i}.png", caption="a cat")
    ds = ds_for(tmp_path / "train", regularization_path=str(tmp_path / "reg"))
    scan = scan_dataset(ds)
    assert any("3 regularization images" in w and "first 1" in w for w in scan.warnings)
    counts = Counter(scan.items[i].path.name for batch in BatchPlan(scan, ds, seed=0).epoch(0) for i in batch)
    assert counts == {"a.png": 1, "r0.png": 1}


def test_dataset_repeats_weigh_training_images_only_and_every_regularization_image_is_drawn(tmp_path):
    solid(tmp_path / "train" / "a.png", caption="cat")
    solid(tmp_path / "train" / "b.png", caption="cat")
    for i in range(6):
        solid(tmp_path / "reg" / f"r{i}.png", caption="a cat")
    solid(tmp_path / "reg" / "2_pose" / "p.png", caption="a cat sitting")  # an N_ subfolder keeps its repeats
    ds = ds_for(tmp_path / "train", regularization_path=str(tmp_path / "reg"), repeats=4)
    scan = scan_dataset(ds)
    assert scan.num_images == 8 and scan.num_reg_images == 8 and not scan.warnings
    counts = Counter(scan.items[i].path.name for batch in BatchPlan(scan, ds, seed=0).epoch(0) for i in batch)
    assert counts == {"a.png": 4, "b.png": 4, "p.png": 2, **{f"r{i}.png": 1 for i in range(6)}}


def test_a_missing_or_empty_regularization_folder_is_named(tmp_path):
    solid(tmp_path / "train" / "a.png", caption="cat")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="regularization folder .*nope does not exist: check "
                                           "dataset.regularization_path"):
        scan_dataset(ds_for(tmp_path / "train", regularization_path=str(tmp_path / "nope")))
    with pytest.raises(DatasetError, match="no image found in regularization folder .*empty"):
        scan_dataset(ds_for(tmp_path / "train", regularization_path=str(tmp_path / "empty")))


def test_root_named_like_a_repeats_folder_warns_that_its_number_is_not_used(tmp_path):
    root = tmp_path / "10_cat"
    solid(root / "a.png")
    scan = scan_dataset(ds_for(root))
    assert scan.items[0].repeats == 1
    assert any("10_cat" in w and "parent" in w for w in scan.warnings)


# ---------------------------------------------------------------------------------------------------------------
# damaged and foreign files

def _bad_files(root: Path) -> dict[str, str]:
    """name -> a word its skip reason must hold."""
    png, jpeg = noise_bytes("PNG"), noise_bytes("JPEG")
    (root / "empty.png").write_bytes(b"")
    (root / "cut.png").write_bytes(png[: len(png) // 2])
    (root / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "noise.png").write_bytes(random.Random(0).randbytes(600))
    (root / "letter.jpg").write_text("Dear Sir, this is not a picture.\n", encoding="utf-8")
    return {"empty.png": "empty", "cut.png": "truncated", "cut.jpg": "truncated", "noise.png": "not an image",
            "letter.jpg": "not an image"}


def test_damaged_files_are_skipped_with_reasons_and_other_files_ignored(tmp_path):
    solid(tmp_path / "good.png", caption="ok")
    expected = _bad_files(tmp_path)
    (tmp_path / "notes.txt").write_text("not a caption of anything", encoding="utf-8")
    (tmp_path / "meta.json").write_text("{}", encoding="utf-8")
    (tmp_path / ".hidden.png").write_bytes(b"garbage")
    (tmp_path / "._good.png").write_bytes(b"\x00\x05\x16\x07")  # macOS AppleDouble sidecar
    (tmp_path / ".thumbs").mkdir()
    (tmp_path / ".thumbs" / "t.png").write_bytes(b"garbage")
    scan = scan_dataset(ds_for(tmp_path))

    assert names(item.path for item in scan.items) == {"good.png"}
    reasons = {s.path.name: s.reason for s in scan.skipped}
    assert set(reasons) == set(expected)
    for name, word in expected.items():
        assert word in reasons[name], (name, reasons[name])


def test_truncated_files_are_refused_even_when_pil_is_told_to_accept_them(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some libraries do at import
    solid(tmp_path / "good.png")
    _bad_files(tmp_path)
    scan = scan_dataset(ds_for(tmp_path), workers=4)
    assert {"cut.png", "cut.jpg"} <= names(s.path for s in scan.skipped)
    with pytest.raises(ImageLoadError, match="truncated"):
        load_image(tmp_path / "cut.jpg")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is restored


def test_parallel_scan_matches_sequential_scan(tmp_path):
    for i in range(12):
        solid(tmp_path / f"{i:02d}.png", size=(32 + i, 32))
    _bad_files(tmp_path)
    one, many = scan_dataset(ds_for(tmp_path), workers=1), scan_dataset(ds_for(tmp_path), workers=4)
    assert one.items == many.items and one.skipped == many.skipped


def test_load_image_names_the_file_it_cannot_read(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageLoadError, match=r"empty\.png.*empty file"):
        load_image(tmp_path / "empty.png")


@pytest.mark.parametrize("setup, needle", [
    ("empty", "no image found"),
    ("only_bad", "all 5 image files were skipped"),
    ("only_text", "no image found"),
])
def test_no_usable_image_raises_naming_the_folder_and_the_fix(tmp_path, setup, needle):
    root = tmp_path / "my-set"
    root.mkdir()
    if setup == "only_bad":
        _bad_files(root)
    if setup == "only_text":
        (root / "a.txt").write_text("caption without image", encoding="utf-8")
    with pytest.raises(DatasetError) as info:
        scan_dataset(ds_for(root))
    message = str(info.value)
    assert str(root) in message and needle in message and "10_name" in message


def test_missing_or_empty_dataset_path_raises(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        scan_dataset(ds_for(tmp_path / "nope"))
    with pytest.raises(DatasetError, match="empty"):
        scan_dataset(DatasetSection(path=""))
    (tmp_path / "f.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="is a file"):
        scan_dataset(ds_for(tmp_path / "f.png"))


def test_scanning_does_not_import_torch_or_diffusers(tmp_path):
    solid(tmp_path / "a.png")
    code = (f"import sys; from trainer.data import scan_dataset; from trainer.config import DatasetSection; "
            f"scan_dataset(DatasetSection(path={str(tmp_path)!r})); "
            f"print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------------------------
# colour modes and orientation

RED, BLUE = (255, 0, 0), (0, 0, 255)


@pytest.mark.parametrize("orientation, red_at_top", [(6, True), (8, False)])
def test_exif_rotated_jpeg_is_loaded_upright(tmp_path, orientation, red_at_top):
    img = Image.new("RGB", (40, 20), BLUE)
    img.paste(RED, (0, 0, 20, 20))  # left half red as stored
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = save(img, tmp_path / "photo.jpg", quality=95, exif=exif)

    [item] = scan_dataset(ds_for(tmp_path)).items
    assert (item.width, item.height) == (20, 40)
    upright = load_image(path)
    assert upright.size == (20, 40)
    top, bottom = upright.getpixel((10, 5)), upright.getpixel((10, 35))
    reddish = lambda p: p[0] > 200 and p[2] < 60  # noqa: E731
    bluish = lambda p: p[2] > 200 and p[0] < 60  # noqa: E731
    assert (reddish(top) and bluish(bottom)) if red_at_top else (bluish(top) and reddish(bottom))


def test_rgba_and_la_are_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (4, 1), (255, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 255, 255))
    rgba.putpixel((2, 0), (0, 0, 0, 128))
    out = load_image(save(rgba, tmp_path / "a.png"))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (0, 0, 255)
    assert all(abs(c - 127) <= 1 for c in out.getpixel((2, 0)))
    la = Image.new("LA", (2, 1), (0, 0))
    la.putpixel((1, 0), (40, 255))
    out = load_image(save(la, tmp_path / "la.png"))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (40, 40, 40)


def test_grey_and_palette_images_become_rgb(tmp_path):
    assert load_image(save(Image.new("L", (2, 2), 100), tmp_path / "l.png")).getpixel((0, 0)) == (100, 100, 100)
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0, 0, 0] * 254)
    palette.putpixel((1, 0), 1)
    out = load_image(save(palette, tmp_path / "p.png"))
    assert out.getpixel((0, 0)) == (10, 20, 30) and out.getpixel((1, 0)) == (200, 100, 50)
    out = load_image(save(palette, tmp_path / "pt.png", transparency=0))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (200, 100, 50)
    out = load_image(save(palette, tmp_path / "pt.gif", transparency=1))
    assert out.getpixel((0, 0)) == (10, 20, 30) and out.getpixel((1, 0)) == (255, 255, 255)


def test_cmyk_becomes_rgb(tmp_path):
    cmyk = Image.new("CMYK", (3, 1), (255, 0, 0, 0))
    cmyk.putpixel((1, 0), (0, 0, 0, 255))
    cmyk.putpixel((2, 0), (0, 0, 0, 0))
    out = load_image(save(cmyk, tmp_path / "c.tif"))
    assert [out.getpixel((x, 0)) for x in range(3)] == [(0, 255, 255), (0, 0, 0), (255, 255, 255)]
    out = load_image(save(Image.new("CMYK", (16, 16), (0, 255, 0, 0)), tmp_path / "c.jpg", quality=95))
    assert all(abs(a - b) <= 8 for a, b in zip(out.getpixel((8, 8)), (255, 0, 255)))


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    img = Image.new("I;16", (3, 1), 0)
    for x, value in enumerate((1000, 32896, 65535)):
        img.putpixel((x, 0), value)
    path = save(img, tmp_path / "deep.png")
    assert Image.open(path).mode == "I;16"  # what Pillow reads back from a 16-bit PNG
    out = load_image(path)
    assert [out.getpixel((x, 0)) for x in range(3)] == [(4, 4, 4), (128, 128, 128), (255, 255, 255)]
    wide = Image.new("I", (2, 1), 0)
    wide.putpixel((1, 0), 65535)
    wide.putpixel((0, 0), 257 * 50)
    assert [to_rgb(wide).getpixel((x, 0)) for x in range(2)] == [(50, 50, 50), (255, 255, 255)]


# ---------------------------------------------------------------------------------------------------------------
# buckets and batch plans

def test_buckets_are_step_multiples_near_the_target_area():
    buckets = make_buckets(512, 64)
    assert (512, 512) in buckets and (1024, 256) in buckets and (256, 1024) in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0
        assert 0.75 * 512 * 512 <= w * h <= 512 * 512
    assert all(w % 24 == 0 and h % 24 == 0 for w, h in make_buckets(96, 12))  # 12 -> lcm with the VAE's 8


def _shapes_dataset(root: Path) -> list[tuple[int, int]]:
    shapes = [(96, 48), (48, 96), (60, 40), (40, 60), (50, 50), (100, 75), (75, 100), (64, 64), (90, 30)]
    for i, size in enumerate(shapes):
        solid(root / f"{i}.png", size=size)
    solid(root / "5_more" / "x.png", size=(60, 40))
    return shapes


def test_each_batch_comes_from_one_bucket_that_keeps_the_aspect(tmp_path):
    _shapes_dataset(tmp_path)
    ds = ds_for(tmp_path, resolution=64, bucket_step=8, batch_size=3)
    scan = scan_dataset(ds)
    plan = BatchPlan(scan, ds, seed=7)
    for index, item in enumerate(scan.items):
        w, h = plan.bucket_of(index)
        assert w % 8 == 0 and h % 8 == 0 and w * h <= 64 * 64
        assert abs(math.log(w / h) - math.log(item.width / item.height)) < 0.15, (item.path.name, (w, h))
    batches = plan.epoch(0)
    assert len(batches) == plan.steps_per_epoch
    assert all(len({plan.bucket_of(i) for i in batch}) == 1 for batch in batches)
    assert all(1 <= len(batch) <= 3 for batch in batches)
    assert Counter(i for b in batches for i in b) == {i: item.repeats for i, item in enumerate(scan.items)}
    stats = bucket_stats(scan, plan)
    assert sum(stats.values()) == len(scan.items) and set(stats) == {plan.bucket_of(i) for i in range(10)}


def test_without_bucketing_every_image_trains_square(tmp_path):
    _shapes_dataset(tmp_path)
    ds = ds_for(tmp_path, resolution=64, bucketing=False, batch_size=4)
    scan = scan_dataset(ds)
    plan = BatchPlan(scan, ds, seed=0)
    assert {plan.bucket_of(i) for i in range(len(scan.items))} == {(64, 64)}
    assert plan.steps_per_epoch == math.ceil(scan.num_images / 4) == 4  # 9 + 5 = 14 images, last batch partial
    assert sorted(len(b) for b in plan.epoch(0)) == [2, 4, 4, 4]


def test_epoch_order_is_deterministic_per_seed_and_epoch(tmp_path):
    _shapes_dataset(tmp_path)
    ds = ds_for(tmp_path, resolution=64, batch_size=2)
    scan = scan_dataset(ds)
    plan, again = BatchPlan(scan, ds, seed=3), BatchPlan(scan, ds, seed=3)
    assert plan.epoch(0) == again.epoch(0) and plan.epoch(5) == again.epoch(5)
    assert plan.epoch(0) != plan.epoch(1)
    assert plan.epoch(0) != BatchPlan(scan, ds, seed=4).epoch(0)
    for epoch in (0, 1):
        assert sorted(i for b in plan.epoch(epoch) for i in b) == sorted(i for b in again.epoch(0) for i in b)


# ---------------------------------------------------------------------------------------------------------------
# pixels: crop, flip, range

def _ramp(path: Path, size=(64, 32)) -> Path:
    """Red channel = 4 * x, so a crop's first column tells where it started."""
    w, h = size
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[:, :, 0] = (np.arange(w) * 4).astype(np.uint8)[None, :]
    arr[:, :, 1] = (np.arange(h) * 4).astype(np.uint8)[:, None]
    return save(Image.fromarray(arr), path)


def _left(pixels: torch.Tensor) -> int:
    return round(((pixels[0, 0, 0].item() + 1) * 127.5) / 4)


def test_center_crop_is_centred_and_pixels_are_in_range(tmp_path):
    _ramp(tmp_path / "ramp.png")
    [item] = scan_dataset(ds_for(tmp_path)).items
    pixels = load_pixels(item, (32, 32), "center", False, random.Random(0))
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32 and pixels.is_contiguous()
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert _left(pixels) == 16
    resized = load_pixels(item, (16, 16), "center", False, random.Random(0))  # 64x32 covers 16x16 at 32x16
    assert resized.shape == (3, 16, 16) and 15 <= _left(resized) <= 18  # x=16 of the source, resampled


def test_random_crop_moves_with_the_rng_and_repeats_with_its_seed(tmp_path):
    _ramp(tmp_path / "ramp.png")
    [item] = scan_dataset(ds_for(tmp_path)).items
    lefts = {_left(load_pixels(item, (32, 32), "random", False, random.Random(seed))) for seed in range(12)}
    assert len(lefts) > 3 and all(0 <= x <= 32 for x in lefts)
    a = load_pixels(item, (32, 32), "random", False, random.Random(5))
    b = load_pixels(item, (32, 32), "random", False, random.Random(5))
    assert torch.equal(a, b)


def test_flip_mirrors_the_crop(tmp_path):
    _ramp(tmp_path / "ramp.png")
    [item] = scan_dataset(ds_for(tmp_path)).items
    plain = load_pixels(item, (32, 32), "center", False, random.Random(0))
    flipped = load_pixels(item, (32, 32), "center", True, random.Random(0))
    assert torch.equal(flipped, torch.flip(plain, dims=[2])) and not torch.equal(flipped, plain)


def test_needs_fresh_pixels_only_for_random_augmentation(tmp_path):
    assert not needs_fresh_pixels(ds_for(tmp_path))
    assert needs_fresh_pixels(ds_for(tmp_path, crop="random"))
    assert needs_fresh_pixels(ds_for(tmp_path, flip=True))
    assert uses_latent_cache(ds_for(tmp_path, cache_latents="disk"))
    assert not uses_latent_cache(ds_for(tmp_path, cache_latents="off"))
    assert not uses_latent_cache(ds_for(tmp_path, flip=True))


# ---------------------------------------------------------------------------------------------------------------
# tag shuffle and caption dropout

def test_tag_shuffle_keeps_the_first_tags_in_place(tmp_path):
    item = _item(tmp_path, "a, b, c, d, e, f")
    ds = ds_for(tmp_path, trigger="zkx", shuffle_tags=True, keep_tokens=2)
    rng = random.Random(0)
    seen = set()
    for _ in range(50):
        tags = build_caption(item, ds, rng).split(", ")
        assert tags[:2] == ["zkx", "a"] and sorted(tags[2:]) == ["b", "c", "d", "e", "f"]
        seen.add(tuple(tags))
    assert len(seen) > 10
    off = ds_for(tmp_path, trigger="zkx")
    assert build_caption(item, off, random.Random(0)) == "zkx, a, b, c, d, e, f"


def test_caption_dropout_rate_matches_over_many_draws(tmp_path):
    item = _item(tmp_path, "red square")
    ds = ds_for(tmp_path, trigger="zkx", caption_dropout=0.3)
    rng = random.Random(123)
    dropped = sum(build_caption(item, ds, rng) == "" for _ in range(4000))
    assert abs(dropped / 4000 - 0.3) < 0.03
    never = ds_for(tmp_path, trigger="zkx", caption_dropout=0.0)
    always = ds_for(tmp_path, trigger="zkx", caption_dropout=1.0)
    assert all(build_caption(item, never, rng) for _ in range(200))
    assert not any(build_caption(item, always, rng) for _ in range(200))


# ---------------------------------------------------------------------------------------------------------------
# latent cache

def test_latent_cache_key_follows_file_content_and_transform(tmp_path):
    path = solid(tmp_path / "a.png", colour=(10, 20, 30))
    [item] = scan_dataset(ds_for(tmp_path)).items
    cache = LatentCache("memory")
    key = cache.key(item, (32, 32), "center")
    assert cache.key(item, (32, 32), "center") == key
    assert len({key, cache.key(item, (32, 40), "center"), cache.key(item, (32, 32), "center", flip=True),
                cache.key(item, (32, 32), "box:0,0,32,32"), LatentCache("memory", model_key="other-vae").key(
                    item, (32, 32), "center")}) == 5

    latents = torch.randn(4, 4, 4)
    cache.put(item, (32, 32), "center", latents)
    assert torch.equal(cache.get(item, (32, 32), "center"), latents)
    solid(path, colour=(10, 20, 31))  # same size, same name, different bytes
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10_000_000))  # coarse-mtime filesystems
    assert cache.key(item, (32, 32), "center") != key
    assert cache.get(item, (32, 32), "center") is None
    assert LatentCache("memory").key(item, (32, 32), "center") != key


def test_disk_cache_survives_a_new_instance_and_recovers_from_damage(tmp_path):
    solid(tmp_path / "data" / "a.png")
    [item] = scan_dataset(ds_for(tmp_path / "data")).items
    folder = tmp_path / "cache"
    latents = torch.randn(4, 4, 4)
    calls = []
    first = LatentCache("disk", folder)
    got = first.get_or_compute(item, (32, 32), lambda: calls.append(1) or latents)
    assert torch.equal(got, latents) and calls == [1]
    files = list(folder.iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"  # no temporary files left behind

    second = LatentCache("disk", folder)
    assert torch.equal(second.get_or_compute(item, (32, 32), lambda: calls.append(2) or latents), latents)
    assert calls == [1] and second.hits == 1 and len(second) == 1

    files[0].write_bytes(b"not safetensors")
    assert LatentCache("disk", folder).get(item, (32, 32), "center") is None
    assert LatentCache("off").get_or_compute(item, (32, 32), lambda: latents) is latents
    with pytest.raises(ValueError, match="mode"):
        LatentCache("ram")


def test_image_extensions_are_lower_case_with_dots():
    assert {".png", ".jpg", ".jpeg", ".webp"} <= IMAGE_EXTENSIONS
    assert all(ext.startswith(".") and ext == ext.lower() for ext in IMAGE_EXTENSIONS)


@pytest.mark.parametrize("encoding, bom", [("utf-16-le", b"\xff\xfe"), ("utf-16-be", b"\xfe\xff"),
                                           ("utf-8", b"\xef\xbb\xbf"), ("utf-32-le", b"\xff\xfe\x00\x00")])
def test_captions_with_a_byte_order_mark_are_read_in_their_encoding(tmp_path, encoding, bom):
    """Issue 23 item 15: UTF-16 with a BOM was read as Windows-1252, BOM and NUL bytes kept in the caption."""
    from trainer import read_caption
    solid(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(bom + "zkx, a café\r\nsmiling\r\n".encode(encoding))
    caption = read_caption(tmp_path / "a.png")
    assert (caption.text, caption.issues) == ("zkx, a café, smiling", ())
    if encoding != "utf-8":  # damaged: a trailing byte that is not a whole character
        (tmp_path / "a.txt").write_bytes(bom + "odd".encode(encoding) + b"\x00")
        assert read_caption(tmp_path / "a.png").text == "odd\ufffd"
