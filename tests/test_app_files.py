"""Upload safety: sanitised names, no overwrites, atomic writes, zip-slip and zip-bomb refusal."""
import os
import zipfile

import pytest

from app import files as F


@pytest.mark.parametrize("name, expected", [
    ("../../etc/passwd", "passwd"),
    ("..\\..\\windows\\evil.PNG", "evil.png"),
    ("/abs/path/photo 1.jpg", "photo 1.jpg"),
    ("..", "file"),
    (".hidden", "hidden"),
    ("we<ird>|na:me?.png", "we_ird__na_me_.png"),
])
def test_safe_filename_keeps_only_a_plain_last_component(name, expected):
    assert F.safe_filename(name) == expected


def test_unique_path_never_reuses_a_stem(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "b.txt").write_text("caption")
    assert F.unique_path(tmp_path, "a.png").name == "a-2.png"
    assert F.unique_path(tmp_path, "b.jpg").name == "b-2.jpg"  # would have adopted b.txt as its caption
    taken = set()
    assert [F.unique_path(tmp_path, "c.png", taken).name for _ in range(2)] == ["c.png", "c-2.png"]


def test_copy_atomic_leaves_no_temp_files_and_a_readable_mode(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(b"one")
    dst = tmp_path / "dst"
    dst.mkdir()
    F.copy_atomic(src / "a.png", dst / "x.png")
    (src / "a.png").write_bytes(b"two")
    F.copy_atomic(src / "a.png", dst / "x.png")
    assert [p.name for p in dst.iterdir()] == ["x.png"]
    assert (dst / "x.png").read_bytes() == b"two"
    assert (dst / "x.png").stat().st_mode & 0o044, "readable by others under the usual umask, unlike mkstemp's 0600"


def test_extract_zip_flattens_member_paths_so_nothing_escapes(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("../../escape.png", b"png")
        z.writestr("/abs/root.png", b"png")
        z.writestr("sub/dir/ok.png", b"png")
        z.writestr("sub/ok.png", b"png2")
        z.writestr("notes.exe", b"MZ")
    dest = tmp_path / "out"
    files, skipped = F.extract_zip(archive, dest, {".png"}, F.Budget(10**6, "over the limit"))
    assert sorted(p.relative_to(dest).as_posix() for p in files) == [
        "abs/root.png", "escape.png", "sub/dir/ok.png", "sub/ok.png"]
    assert all(dest in p.resolve().parents for p in files)
    assert not (tmp_path / "escape.png").exists()
    assert skipped == [("notes.exe", "not an image or caption file")]


def test_extract_zip_refuses_bombs_and_garbage(tmp_path, monkeypatch):
    budget = F.Budget(1_000_000, "the limit is 1 MB")
    archive = tmp_path / "big.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("a.png", os.urandom(2_000_000))
    with pytest.raises(F.UploadError, match="unpacks to 2.0 MB: the limit is 1 MB"):
        F.extract_zip(archive, tmp_path / "out", {".png"}, budget)
    with zipfile.ZipFile(tmp_path / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("a.png", b"\0" * 2_000_000)
    with pytest.raises(F.UploadError, match="zip bomb"):
        F.extract_zip(tmp_path / "bomb.zip", tmp_path / "out", {".png"}, budget)
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(F.UploadError, match="bad.zip is not a readable zip"):
        F.extract_zip(tmp_path / "bad.zip", tmp_path / "out", {".png"}, budget)
    assert not list((tmp_path / "out").rglob("*.png"))
