"""One atomic-write helper: temp file beside the target, fsync, one rename, temp removed on failure, normal modes."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from trainer import atomic

ROOT = Path(__file__).resolve().parent.parent


def test_atomic_path_replaces_in_one_rename_and_fsyncs(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    target = tmp_path / "sub" / "a.txt"
    atomic.write_text_atomic(target, "one")
    assert target.read_text() == "one" and synced, "the data reaches the disk before the rename"
    assert os.listdir(target.parent) == ["a.txt"]


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = atomic.write_text_atomic(tmp_path / "a.json", "old")
    with pytest.raises(TypeError):
        atomic.write_json_atomic(target, {"x": object()})
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["a.json"]


def test_atomic_dir_swaps_a_whole_folder_and_cleans_up(tmp_path):
    final = tmp_path / "model"
    with atomic.atomic_dir(final) as tmp:
        (tmp / "w.bin").write_text("v1")
    with atomic.atomic_dir(final) as tmp:
        (tmp / "w.bin").write_text("v2")
    assert (final / "w.bin").read_text() == "v2"
    with pytest.raises(RuntimeError):
        with atomic.atomic_dir(final) as tmp:
            (tmp / "w.bin").write_text("half")
            raise RuntimeError("crash")
    assert (final / "w.bin").read_text() == "v2" and os.listdir(tmp_path) == ["model"]


def test_the_public_api_exports_the_helpers():
    import trainer
    from trainer import atomic
    for name in ("atomic_path", "write_text_atomic", "write_json_atomic", "save_image_atomic"):
        assert getattr(trainer, name) is getattr(atomic, name)


def test_cli_report_and_png_writers_leave_no_temp_on_failure(tmp_path):
    from trainer.adapters import cli
    report = {"kept_overall": 1.0, "layers": {"a": {"kept": 1.0}}, "bad": object()}
    with pytest.raises(TypeError):
        cli._print_report(report, str(tmp_path / "r.json"))

    class BrokenImage:
        def save(self, path, format=None):
            Path(path).write_bytes(b"half")
            raise OSError("disk full")
    with pytest.raises(OSError):
        cli.save_image_atomic(BrokenImage(), tmp_path / "x.png")
    assert os.listdir(tmp_path) == []


def test_no_hand_written_temp_files_outside_the_helper():
    # derive_clip_tokenizer.py is a standalone script run on its own to make shipped data (chmods 0644 itself)
    allowed = {ROOT / "trainer" / "atomic.py", ROOT / "trainer" / "models" / "configs" / "derive_clip_tokenizer.py"}
    found = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "trainer").rglob("*.py"))
             if p not in allowed and re.search(r"mkstemp|mkdtemp|os\.replace", p.read_text(encoding="utf-8"))]
    assert not found, f"write through trainer.atomic instead: {found}"


_MODES_SCRIPT = r"""
import json, os, sys, stat
os.umask(0o022)
sys.path.insert(0, sys.argv[2])
from pathlib import Path
import torch
from trainer import config as C, runs
from trainer.formats import save_adapter
from trainer.lora_state import Adapter, LoraLayer
out = Path(sys.argv[1])
cfg = C.TrainConfig()
cfg.saving.runs_dir = str(out / "runs")
run_dir = runs.create_run_dir(cfg)
with runs.new_checkpoint_dir(run_dir, 5) as tmp:
    (tmp / "state.json").write_text("{}")
adapter = Adapter({"lora_unet_x_to_q": LoraLayer(torch.ones(2, 4), torch.ones(4, 2), 2.0)})
save_adapter(adapter, out / "a.safetensors")
mode = lambda p: oct(stat.S_IMODE(os.stat(p).st_mode))
print(json.dumps({"adapter": mode(out / "a.safetensors"), "config": mode(run_dir / "config.toml"),
                  "checkpoint": mode(runs.last_checkpoint(run_dir))}))
"""


def test_written_files_are_readable_by_other_users(tmp_path):
    """A1111/ComfyUI running as another user must be able to read the LoRA (mkstemp alone makes it 0600)."""
    result = subprocess.run([sys.executable, "-c", _MODES_SCRIPT, str(tmp_path), str(ROOT)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    modes = json.loads(result.stdout.strip().splitlines()[-1])
    assert modes == {"adapter": "0o644", "config": "0o644", "checkpoint": "0o755"}
