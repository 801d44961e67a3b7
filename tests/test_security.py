"""Issue 15, security: nothing outside the folders the person running the app allowed is read, copied or served.

Each test reproduces what a hostile client (or file) did on the main branch before the fix, through the handlers
the browser calls."""
from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from app import datasets as D
from app.files import UploadError
from app.settings import AppSettings
from app.tabs import dataset as tab


def png(path: Path, colour=(200, 30, 30), pad: int = 0) -> Path:
    """A real 16x16 PNG; `pad` zero bytes after its end (readers ignore them; zip compresses them to nothing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, "PNG")
    path.write_bytes(buf.getvalue() + b"\0" * pad)
    return path


@pytest.fixture
def outside(tmp_path) -> Path:
    """Files that are not the user's to import: a secret and an image elsewhere on the server."""
    folder = tmp_path / "server"
    folder.mkdir()
    (folder / "secret.txt").write_text("the database password")
    png(folder / "private.png", (1, 2, 3))
    return folder


def settings_for(tmp_path, *import_dirs) -> AppSettings:
    return AppSettings(data_dir=tmp_path / "datasets", runs_dir=tmp_path / "runs", adapters_dir=tmp_path / "ad",
                       import_dirs=tuple(import_dirs))


# 1. "Import a folder" ---------------------------------------------------------------------------------------------

def test_import_refuses_a_folder_nobody_allowed(tmp_path, outside):
    with pytest.raises(UploadError, match="--allow-import"):
        tab.import_folder(settings_for(tmp_path), str(outside))
    assert not (tmp_path / "datasets").exists() or not any((tmp_path / "datasets").iterdir())


def test_import_refuses_a_path_that_climbs_out_of_an_allowed_folder(tmp_path, outside):
    allowed = tmp_path / "photos"
    png(allowed / "a.png")
    with pytest.raises(UploadError, match="--allow-import"):
        tab.import_folder(settings_for(tmp_path, allowed), str(allowed / ".." / "server"))


def test_import_never_follows_a_link_out_of_the_chosen_folder(tmp_path, outside):
    src = tmp_path / "photos"
    png(src / "a.png")
    (src / "a.txt").write_text("a red square")
    (src / "b.txt").symlink_to(outside / "secret.txt")
    (src / "passwd.png").symlink_to("/etc/passwd")
    (src / "c.png").symlink_to(outside / "private.png")
    (src / "linked").symlink_to(outside, target_is_directory=True)
    name, _, text = tab.import_folder(settings_for(tmp_path, src), str(src))
    copied = sorted(p.relative_to(tmp_path / "datasets" / name).as_posix()
                    for p in (tmp_path / "datasets" / name).rglob("*") if p.is_file())
    assert copied == ["a.png", "a.txt"]
    assert "the database password" not in "".join(p.read_text(errors="replace")
                                                     for p in (tmp_path / "datasets").rglob("*.txt"))
    assert "link" in text and "c.png" in text


def test_import_copies_only_valid_images_and_captions(tmp_path):
    src = tmp_path / "photos"
    png(src / "good.png")
    (src / "fake.png").write_text("root:x:0:0:root:/root:/bin/bash")  # an image in name only
    (src / "huge.txt").write_bytes(b"a" * (D.MAX_CAPTION_BYTES + 1))
    name, _, text = tab.import_folder(settings_for(tmp_path, src), str(src))
    assert sorted(p.name for p in (tmp_path / "datasets" / name).iterdir()) == ["good.png"]
    assert "fake.png" in text and "huge.txt" in text


def test_importing_from_the_apps_own_data_folder_needs_no_flag(tmp_path):
    s = settings_for(tmp_path)
    png(s.data_dir / "mine" / "a.png")
    name, _, _ = tab.import_folder(s, str(s.data_dir / "mine"), "copy")
    assert (s.data_dir / name / "a.png").is_file()


def test_the_launch_flag_and_the_environment_allow_import_folders(monkeypatch, tmp_path):
    import launch
    args = launch.parse_args(["--allow-import", str(tmp_path / "a"), "--allow-import", str(tmp_path / "b")])
    monkeypatch.setenv("LORADESK_IMPORT_DIRS", str(tmp_path / "c"))
    s = AppSettings.from_env(import_dirs=args.allow_import)
    assert s.import_dirs == (tmp_path / "a", tmp_path / "b")
    assert AppSettings.from_env().import_dirs == (tmp_path / "c",)


# 2. zip bombs -----------------------------------------------------------------------------------------------------

def zip_of(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def noise_png() -> bytes:
    buf = io.BytesIO()
    Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3)).save(buf, "PNG")
    return buf.getvalue()


def test_many_small_members_cannot_add_up_to_a_bomb(tmp_path):
    """On main each member stayed under the 10 MB per-member ratio check, so the whole expanded unchecked."""
    s = settings_for(tmp_path)
    folder = D.create_dataset(s.data_dir, "d")
    member = png(tmp_path / "m.png", pad=3_000_000).read_bytes()
    bomb = zip_of(tmp_path / "bomb.zip", {f"{i:03d}.png": member for i in range(20)})
    assert bomb.stat().st_size < 300_000  # 60 MB inside
    text = tab.upload(s, "d", [str(bomb)])
    assert "Added 0 image(s)" in text and "zip bomb" in text
    assert list(folder.iterdir()) == []


def test_an_upload_larger_than_the_cap_is_refused_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "MAX_UPLOAD_BYTES", 100_000)
    s = settings_for(tmp_path)
    folder = D.create_dataset(s.data_dir, "d")
    photos = {f"{i}.png": noise_png() for i in range(10)}  # 12 KB each that no zip can shrink
    big = zip_of(tmp_path / "big.zip", photos)
    text = tab.upload(s, "d", [str(big)])
    assert "Added 0 image(s)" in text and "limit" in text
    assert list(folder.iterdir()) == []


def test_a_dataset_stops_growing_at_its_cap(tmp_path, monkeypatch):
    s = settings_for(tmp_path)
    folder = D.create_dataset(s.data_dir, "d")
    tab.upload(s, "d", [str(png(tmp_path / "a.png", pad=40_000))])
    monkeypatch.setattr(D, "MAX_DATASET_BYTES", 60_000)
    text = tab.upload(s, "d", [str(png(tmp_path / "b.png", (0, 0, 9), pad=40_000))])
    assert "Added 0 image(s)" in text and "MAX_DATASET" not in text and "full" in text
    assert sorted(p.name for p in folder.iterdir()) == ["a.png"]


# 3. symlinks inside a dataset folder ------------------------------------------------------------------------------

def test_scan_skips_a_link_out_of_the_dataset_unopened(tmp_path, outside, monkeypatch):
    from trainer import TrainConfig, scan_dataset
    from trainer.data import scan as scan_module
    ds_dir = tmp_path / "ds"
    png(ds_dir / "good.png")
    (ds_dir / "escape.png").symlink_to(outside / "private.png")
    (ds_dir / "passwd.png").symlink_to("/etc/passwd")
    (ds_dir / "good.txt").symlink_to(outside / "secret.txt")
    (ds_dir / "5_linked").symlink_to(outside, target_is_directory=True)
    opened = []
    real_probe = scan_module.probe_image
    monkeypatch.setattr(scan_module, "probe_image", lambda p: opened.append(Path(p).name) or real_probe(p))
    cfg = TrainConfig()
    cfg.dataset.path = str(ds_dir)
    scan = scan_dataset(cfg.dataset, workers=1)
    assert [i.path.name for i in scan.items] == ["good.png"]
    assert scan.items[0].caption == ""  # the linked caption is not read
    reasons = {s.path.name: s.reason for s in scan.skipped}
    assert set(reasons) >= {"escape.png", "passwd.png"} and all("link" in r for r in reasons.values())
    assert opened == ["good.png"]


def test_a_link_that_stays_inside_the_dataset_is_used(tmp_path):
    from trainer import TrainConfig, scan_dataset
    ds_dir = tmp_path / "ds"
    png(ds_dir / "sub" / "a.png")
    (ds_dir / "b.png").symlink_to(ds_dir / "sub" / "a.png")
    cfg = TrainConfig()
    cfg.dataset.path = str(ds_dir)
    assert sorted(i.path.name for i in scan_dataset(cfg.dataset, workers=1).items) == ["a.png", "b.png"]


# 4. login -------------------------------------------------------------------------------------------------------

class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_repeated_wrong_passwords_are_slowed_down_per_client():
    from app.auth import LoginThrottle
    clock = Clock()
    throttle = LoginThrottle(free_failures=5, clock=clock)
    for _ in range(5):
        assert throttle.wait_seconds("10.0.0.1") == 0
        throttle.failed("10.0.0.1")
    assert throttle.wait_seconds("10.0.0.1") > 0      # the sixth try must wait
    assert throttle.wait_seconds("10.0.0.2") == 0      # another client is not punished
    waits = []
    for _ in range(6):
        clock.now += throttle.wait_seconds("10.0.0.1")
        throttle.failed("10.0.0.1")
        waits.append(throttle.wait_seconds("10.0.0.1"))
    assert waits == sorted(waits) and waits[-1] <= throttle.max_wait and waits[-1] > waits[0]
    throttle.succeeded("10.0.0.1")
    assert throttle.wait_seconds("10.0.0.1") == 0


def test_the_login_route_is_throttled(tmp_path):
    """Through the real Gradio app: 100 wrong passwords are no longer checked at hundreds per second."""
    import gradio as gr
    from fastapi.testclient import TestClient
    from gradio.routes import App
    from app.auth import LoginThrottle, app_kwargs
    with gr.Blocks() as demo:
        gr.Markdown("hi")
    throttle = LoginThrottle(free_failures=3, clock=Clock())
    demo.auth = [("me", "right")]  # what launch(auth=...) sets before it builds the same app
    app = App.create_app(demo, app_kwargs=app_kwargs(throttle))
    client = TestClient(app)
    codes = [client.post("/login", data={"username": "me", "password": f"wrong{i}"}).status_code for i in range(6)]
    assert codes[:3] == [400, 400, 400] and codes[3:] == [429, 429, 429]
    refused = client.post("/login", data={"username": "me", "password": "right"})
    assert refused.status_code == 429 and "Retry-After" in refused.headers  # even the right one waits its turn
    throttle.clock.now += 3600
    assert client.post("/login", data={"username": "me", "password": "right"}).status_code == 200


def test_credentials_come_from_a_file_or_the_environment(tmp_path, monkeypatch):
    import launch
    creds = tmp_path / "creds"
    creds.write_text("# users\nme:s3cret:with:colons\nyou:pw\n")
    assert launch.read_auth(launch.parse_args(["--auth-file", str(creds)])) == [("me", "s3cret:with:colons"),
                                                                                ("you", "pw")]
    monkeypatch.setenv("LORADESK_AUTH", "env:pw")
    assert launch.read_auth(launch.parse_args([])) == [("env", "pw")]
    monkeypatch.delenv("LORADESK_AUTH")
    assert launch.read_auth(launch.parse_args([])) is None
    with pytest.raises(SystemExit):
        launch.read_auth(launch.parse_args(["--auth-file", str(tmp_path / "missing")]))


# 5. the disk latent cache ---------------------------------------------------------------------------------------

def test_the_apps_disk_cache_stays_in_its_data_folder(tmp_path):
    from app import forms
    from trainer import TrainConfig
    s = settings_for(tmp_path)
    png(s.data_dir / "mine" / "a.png")
    cfg = TrainConfig()
    cfg.dataset.path = str(s.data_dir / "mine")
    cfg.dataset.cache_latents = "disk"
    cfg.dataset.cache_dir = str(tmp_path / "anywhere")
    cfg, errors = forms.values_to_config(forms.config_to_values(cfg), str(s.runs_dir), settings=s)
    assert Path(cfg.dataset.cache_dir).resolve().is_relative_to(s.data_dir.resolve())
    assert not errors


def test_the_app_trains_only_on_folders_it_may_read(tmp_path, outside):
    from app import forms
    from trainer import TrainConfig
    s = settings_for(tmp_path)
    png(outside / "0_x" / "a.png")
    cfg = TrainConfig()
    cfg.dataset.path = str(outside)
    _, errors = forms.values_to_config(forms.config_to_values(cfg), str(s.runs_dir), settings=s)
    assert "--allow-import" in errors["dataset.path"]
    cfg.dataset.path = str(s.data_dir / "mine")
    cfg.dataset.regularization_path = str(outside)
    _, errors = forms.values_to_config(forms.config_to_values(cfg), str(s.runs_dir), settings=s)
    assert "--allow-import" in errors["dataset.regularization_path"]


def test_the_engine_writes_a_disk_cache_where_the_config_says(tmp_path):
    from trainer import TrainConfig
    from trainer.data import cache_folder
    cfg = TrainConfig()
    cfg.dataset.path = str(tmp_path / "ds")
    assert cache_folder(cfg.dataset) == tmp_path / "ds" / ".loradesk-cache"
    cfg.dataset.cache_dir = str(tmp_path / "c")
    assert cache_folder(cfg.dataset) == tmp_path / "c"


def test_guesses_sent_all_at_once_are_throttled_too():
    """Review finding: the failure was recorded only after the answer, so parallel guesses all saw 'no wait'."""
    import asyncio
    from app.auth import LoginThrottle, ThrottledLogin
    throttle = LoginThrottle(free_failures=5, clock=Clock())
    checked = []

    async def gradio_login(scope, receive, send):
        checked.append(1)
        await asyncio.sleep(0.01)  # every request is in flight before the first answers
        await send({"type": "http.response.start", "status": 400, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def sink(message):
        pass

    app = ThrottledLogin(gradio_login, throttle)
    scope = {"type": "http", "method": "POST", "path": "/login", "client": ("10.0.0.9", 1)}

    async def burst():
        await asyncio.gather(*[app(scope, None, sink) for _ in range(100)])

    asyncio.run(burst())
    assert len(checked) == 5
    for _ in range(2000):  # a long campaign never overflows the backoff into a 500
        throttle.failed("10.0.0.9")
    assert 0 < throttle.wait_seconds("10.0.0.9") <= throttle.max_wait


def test_an_adapter_slot_reads_only_the_apps_own_adapters(tmp_path, outside):
    """Review finding: a typed slot value read any server file, and a blend export copied it into adapters/."""
    from app import generation as G
    from app.errors import AppError
    s = settings_for(tmp_path)
    (outside / "private.safetensors").write_bytes(b"\0" * 16)
    for call in (lambda slots: G.export_blend(s, "", slots), lambda slots: G.analyze_slots(s, slots)):
        with pytest.raises(AppError, match="not one of this app's adapters"):
            call([G.Slot(str(outside / "private.safetensors"), 1.0)])
    assert not s.adapters_dir.exists() or not any(s.adapters_dir.iterdir())


def test_caption_edits_cannot_grow_without_bound(tmp_path):
    s = settings_for(tmp_path)
    folder = D.create_dataset(s.data_dir, "d")
    png(folder / "a.png")
    (folder / "a.txt").write_text("a" * 100)
    with pytest.raises(UploadError, match="not a caption"):
        D.find_replace(folder, "a", "a" * 1000)
    assert (folder / "a.txt").read_text() == "a" * 100
    with pytest.raises(UploadError, match="not a caption"):
        D.save_caption(folder, "a.png", "b" * (D.MAX_CAPTION_BYTES + 1))


def test_a_fifo_named_like_an_image_is_not_opened_by_the_import(tmp_path):
    src = tmp_path / "photos"
    png(src / "a.png")
    os.mkfifo(src / "pipe.png")
    name, _, text = tab.import_folder(settings_for(tmp_path, src), str(src))
    assert "pipe.png (not a regular file)" in text
    assert sorted(p.name for p in (tmp_path / "datasets" / name).iterdir()) == ["a.png"]


# issue 23 -----------------------------------------------------------------------------------------------------------

def test_rotating_forwarded_for_headers_do_not_escape_the_login_throttle(tmp_path, monkeypatch):
    """Item 19: uvicorn trusts X-Forwarded-For from 127.0.0.1, so each guess with a new header counted as a new
    client: 20 wrong passwords were checked after the lockout. The real app, on loopback."""
    import httpx
    from served import served
    with served(monkeypatch, tmp_path, "--auth", "me:right") as demo:
        codes = [httpx.post(f"{demo.local_url}login", data={"username": "me", "password": f"wrong{i}"},
                            headers={"X-Forwarded-For": f"10.0.{i}.7"}, timeout=None).status_code
                 for i in range(25)]
    assert codes[:5] == [400] * 5 and codes[5:] == [429] * 20, codes


def test_a_named_trusted_proxy_passes_on_the_client_it_names(tmp_path, monkeypatch):
    """Item 19: behind a reverse proxy the user names, each client it forwards counts on its own."""
    import httpx
    from served import served
    with served(monkeypatch, tmp_path, "--auth", "me:right", "--trusted-proxy", "127.0.0.1") as demo:
        codes = [httpx.post(f"{demo.local_url}login", data={"username": "me", "password": "wrong"},
                            headers={"X-Forwarded-For": f"10.0.{i // 6}.7"}, timeout=None).status_code
                 for i in range(12)]
    assert codes == ([400] * 5 + [429]) * 2, codes


def test_gradios_upload_route_refuses_a_file_over_the_apps_cap(tmp_path, monkeypatch):
    """Item 20: Gradio's own /upload stored any file up to its own 2 GB, whatever the app's caps said; it follows
    the app's per-upload cap now (lowered here, so the test sends a kilobyte, not gigabytes)."""
    import httpx
    from served import served
    monkeypatch.setattr(D, "MAX_UPLOAD_BYTES", 1000)
    with served(monkeypatch, tmp_path) as demo:
        def upload(size):
            return httpx.post(f"{demo.local_url}gradio_api/upload", files={"files": ("a.zip", b"x" * size)},
                              timeout=None)
        over, at_cap = upload(1001), upload(1000)
    assert over.status_code == 413 and "1000" in over.text, (over.status_code, over.text)
    assert at_cap.status_code == 200
