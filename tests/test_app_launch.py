"""launch.py: flags, the next free port, the warning for a non-local host, and a cheap import path."""
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import launch
from app.settings import AppSettings

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_are_local_private_and_open_the_browser():
    args = launch.parse_args([])
    assert (args.host, args.port, args.share, args.no_browser, args.auth) == ("127.0.0.1", 7860, False, False, None)


def test_auth_needs_user_and_password(capsys):
    with pytest.raises(SystemExit):
        launch.parse_args(["--auth", "nopassword"])
    assert "--auth needs USER:PASS" in capsys.readouterr().err


def test_a_taken_port_moves_to_the_next_free_one():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert launch.free_port("127.0.0.1", port) > port


def test_settings_come_from_flags_over_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LORADESK_BASE_MODEL", "/env/model")
    monkeypatch.setenv("LORADESK_DATA_DIR", str(tmp_path / "env-data"))
    s = AppSettings.from_env(data_dir=str(tmp_path / "flag-data"), base_model=None)
    assert (s.data_dir, s.base_model, s.runs_dir) == (tmp_path / "flag-data", "/env/model", Path("runs"))


def test_building_the_app_loads_no_model_code():
    """The first page must come fast: torch and diffusers load only when a tab first needs them (on a machine
    without NVIDIA or AMD tools, looking for GPUs on page load does not load torch either)."""
    code = ("import sys, shutil; from app.main import build_app; from app.settings import AppSettings; "
            "from app.tabs.train import gpu_picker; build_app(); "
            "assert not (shutil.which('nvidia-smi') or shutil.which('rocm-smi')); "
            "assert gpu_picker(AppSettings()) == {'visible': False}; "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_a_non_local_host_prints_a_warning(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "127.0.0.1")  # launch sets what uvicorn trusts; undone afterwards
    launched = {}

    class FakeApp:
        def queue(self, **kw):
            return self

        def launch(self, **kw):
            launched.update(kw)

    monkeypatch.setattr("app.main.build_app", lambda settings: FakeApp())
    launch.main(["--host", "0.0.0.0", "--no-browser", "--port", "7990", "--data-dir", str(tmp_path / "d"),
                 "--runs-dir", str(tmp_path / "r"), "--adapters-dir", str(tmp_path / "a")])
    assert "WARNING: listening on 0.0.0.0" in capsys.readouterr().err
    assert launched["server_name"] == "0.0.0.0" and launched["share"] is False
    assert launched["inbrowser"] is False and launched["auth"] is None
    assert str((tmp_path / "d").resolve()) in launched["allowed_paths"]


def test_the_app_starts_however_slowly_the_machine_answers(tmp_path, monkeypatch):
    """Issue 23 item 21: at load ~18 Gradio's start-up check (a HEAD to itself with a 3 s timeout) timed out and
    launch died with 'When localhost is not accessible, a shareable link must be created'. Here every such check
    times out, as it did; the app must start and answer."""
    import gradio.networking
    import httpx
    from served import served

    def head_on_a_busy_machine(url, **kwargs):
        raise httpx.ReadTimeout(f"no answer from {url} within {kwargs.get('timeout')} s")

    monkeypatch.setattr(gradio.networking.httpx, "head", head_on_a_busy_machine)
    with served(monkeypatch, tmp_path) as demo:
        assert httpx.get(demo.local_url, timeout=None).status_code == 200
