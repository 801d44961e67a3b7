"""Issue 15: a corpus of odd and broken dataset files (24 kinds, links included), run through the CLI's `validate`,
the app's upload and the app's folder import. Every usable file is used, every broken one is skipped with a
reason, and nothing outside the dataset folder is opened."""
from __future__ import annotations

import builtins
import io
import os
import struct
import zipfile
import zlib
from pathlib import Path

import pytest
from PIL import Image

from app import datasets as D
from app.settings import AppSettings
from app.tabs import dataset as tab
from trainer import TrainConfig, scan_dataset
from trainer.__main__ import main


def save(img: Image.Image, path: Path, fmt: str, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, **kw)
    return path


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb's shape) and holds no pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def build_corpus(root: Path, outside: Path) -> tuple[set[str], set[str], set[str]]:
    """(usable, broken, ignored) relative names; `outside` holds what links point at."""
    rgb = Image.new("RGB", (48, 40), (200, 40, 40))
    usable = {
        "plain.png": lambda p: save(rgb, p, "PNG"),
        "photo.jpg": lambda p: save(rgb, p, "JPEG"),
        "modern.webp": lambda p: save(rgb, p, "WEBP"),
        "old.bmp": lambda p: save(rgb, p, "BMP"),
        "palette.gif": lambda p: save(rgb.convert("P"), p, "GIF"),
        "scan.tiff": lambda p: save(rgb, p, "TIFF"),
        "cmyk.jpg": lambda p: save(rgb.convert("CMYK"), p, "JPEG"),
        "alpha.png": lambda p: save(Image.new("RGBA", (48, 40), (0, 0, 255, 90)), p, "PNG"),
        "sixteen.png": lambda p: save(Image.new("I;16", (48, 40), 40000), p, "PNG"),
        "grey.png": lambda p: save(Image.new("L", (48, 40), 128), p, "PNG"),
        "png-named.jpg": lambda p: save(rgb, p, "PNG"),          # content decides, not the suffix
        "spaced name é.png": lambda p: save(rgb, p, "PNG"),
        "rotated.jpg": lambda p: save(rgb, p, "JPEG", exif=_exif_rotated()),
        "10_subject/inner.png": lambda p: save(rgb, p, "PNG"),
        "tiny.png": lambda p: save(Image.new("RGB", (2, 2)), p, "PNG"),
    }
    broken = {
        "truncated.png": lambda p: p.write_bytes(_png_bytes(rgb)[:60]),
        "empty.png": lambda p: p.write_bytes(b""),
        "text.jpg": lambda p: p.write_text("this is not a picture"),
        "bomb.png": lambda p: p.write_bytes(png_header_only(100_000, 100_000)),
        "garbage.webp": lambda p: p.write_bytes(os.urandom(2000)),
        "escape.png": lambda p: p.symlink_to(outside / "private.png"),
        "passwd.png": lambda p: p.symlink_to("/etc/passwd"),
    }
    ignored = {
        ".hidden.png": lambda p: save(rgb, p, "PNG"),
        "__MACOSX/._plain.png": lambda p: p.write_bytes(b"\0\5\x16\7resource fork"),
    }
    for table in (usable, broken, ignored):
        for name, make in table.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            make(root / name)
    (root / "plain.txt").write_text("a red block")
    (root / "photo.txt").write_bytes("caf\xe9 au lait".encode("cp1252"))  # an old Windows editor's caption
    (root / "modern.txt").write_bytes("\ufeffwith a byte-order mark".encode("utf-8"))
    (root / "grey.txt").symlink_to(outside / "secret.txt")                 # a caption that points outside
    (root / "linked-folder").symlink_to(outside, target_is_directory=True)
    return set(usable), set(broken), set(ignored)


def _png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _exif_rotated():
    exif = Image.Exif()
    exif[0x0112] = 6
    return exif


@pytest.fixture
def corpus(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("the database password")
    save(Image.new("RGB", (32, 32), (1, 2, 3)), outside / "private.png", "PNG")
    root = tmp_path / "corpus"
    usable, broken, ignored = build_corpus(root, outside)
    return root, outside, usable, broken, ignored


@pytest.fixture
def opened(monkeypatch):
    """Every path opened through builtins.open (PIL and the caption reader open files that way)."""
    seen: list[Path] = []
    real = builtins.open

    def recording(file, *args, **kwargs):
        if isinstance(file, (str, Path)):
            seen.append(Path(os.path.realpath(file)))
        return real(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", recording)
    return seen


def test_the_scan_uses_every_usable_file_and_names_every_broken_one(corpus, opened):
    root, outside, usable, broken, ignored = corpus
    cfg = TrainConfig()
    cfg.dataset.path = str(root)
    scan = scan_dataset(cfg.dataset, workers=1)
    used = {i.path.relative_to(root).as_posix() for i in scan.items}
    skipped = {s.path.relative_to(root).as_posix(): s.reason for s in scan.skipped}
    assert used == usable
    assert set(skipped) == broken and all(reason for reason in skipped.values())
    captions = {i.path.name: i.caption for i in scan.items}
    assert captions["photo.jpg"] == "café au lait" and captions["modern.webp"] == "with a byte-order mark"
    assert captions["grey.png"] == "", "a caption that links outside is not read"
    assert not [p for p in opened if p.is_relative_to(outside) or p == Path("/etc/passwd")]


def test_validate_accepts_the_corpus_and_lists_what_it_skips(corpus, tmp_path, capsys, opened):
    root, outside, usable, broken, _ = corpus
    preset = Path(__file__).resolve().parent.parent / "presets" / "tiny-demo.toml"
    code = main(["validate", "--config", str(preset), "--set", f"dataset.path={root}", "--set",
                 "dataset.regularization_path=", "--set", "dataset.trigger=", "--set", "dataset.resolution=32",
                 "--set", f"saving.runs_dir={tmp_path / 'runs'}"])
    out = capsys.readouterr()
    assert code == 0, out.err
    text = out.out + out.err
    assert f"{len(usable)} image" in text
    for name in broken:
        assert Path(name).name in text, name
    assert not [p for p in opened if p.is_relative_to(outside) or p == Path("/etc/passwd")]


def test_the_apps_import_copies_only_the_usable_files(corpus, tmp_path, opened):
    root, outside, usable, broken, _ = corpus
    s = AppSettings(data_dir=tmp_path / "datasets", import_dirs=(root,))
    name, _, text = tab.import_folder(s, str(root))
    items = {i.name: i for i in D.load_items(s.data_dir / name)}
    trained = {n for n, i in items.items() if not i.skipped}
    assert trained == usable
    assert not any(i.skipped for i in items.values()), "broken files are not copied at all"
    assert not [p for p in opened if p.is_relative_to(outside) or p == Path("/etc/passwd")]
    assert "the database password" not in "".join(p.read_text(errors="replace")
                                                     for p in (s.data_dir / name).rglob("*.txt"))
    for n in broken:
        assert Path(n).name in text or "link" in text


def test_the_apps_upload_keeps_the_usable_files_of_a_zip_of_the_corpus(corpus, tmp_path):
    root, _, usable, broken, _ = corpus
    archive = tmp_path / "corpus.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.is_symlink():
                z.write(path, path.relative_to(root).as_posix())
    s = AppSettings(data_dir=tmp_path / "datasets")
    D.create_dataset(s.data_dir, "up")
    text = tab.upload(s, "up", [str(archive)])
    items = {i.name for i in D.load_items(s.data_dir / "up") if not i.skipped}
    assert items == usable, text
    assert f"Added {len(usable)} image(s)" in text
    for n in broken - {"escape.png", "passwd.png"}:
        assert n in text, n
