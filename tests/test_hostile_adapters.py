"""Issue 23, items 2, 7, 9, 10 and 11: the Generate tab and hostile adapters and numbers, as a user reaches them
(the real CLI in a child process, and the Generate tab's handlers as build_app wires them). Each refusal is one line
that names the file or field, exit 2 in the CLI, a status line in the app, and nothing is written."""
from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from test_app_generate import LAYERS, write_adapter
from trainer.formats import save_adapter
from trainer.lora_state import Adapter, LoraLayer

ROOT = Path(__file__).resolve().parent.parent
SDXL_LAYER = "lora_unet_input_blocks_4_1_proj_in"  # kohya's SGM name of an SDXL module


def cli(*argv, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m trainer ...` as a user runs it."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "trainer", *map(str, argv)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The refusal: exit 2, one error line on stderr (beside the libraries' own loading notes), no traceback."""
    err = result.stderr.strip()
    assert result.returncode == 2, (result.returncode, result.stdout, err)
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def raw_adapter(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file
    save_file(tensors, str(path), metadata=metadata)
    return path


def kohya_tensors(seed: int = 0, alpha: float = 2.0, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in LAYERS:
        out[f"{name}.lora_down.weight"] = (torch.randn(2, 64, generator=g) * 10).to(dtype)
        out[f"{name}.lora_up.weight"] = (torch.randn(64, 2, generator=g) * 10).to(dtype)
        out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


# ---- the Generate tab as Gradio runs it ---------------------------------------------------------------------------

def wired(demo, elem_id: str, event: str = "click"):
    """The BlockFunction Gradio runs when the component with `elem_id` fires `event`."""
    ids = {b._id for b in demo.blocks.values() if getattr(b, "elem_id", None) == elem_id}
    found = [f for f in demo.fns.values() if any(t in ids and ev == event for t, ev in f.targets)]
    assert len(found) == 1, f"one {event} handler on #{elem_id}, found {len(found)}"
    return found[0]


def block(demo, elem_id: str):
    found = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == elem_id]
    assert len(found) == 1, elem_id
    return found[0]


def no_progress(*args, **kwargs):
    return None


@pytest.fixture(scope="module")
def app(tiny_model_dir, tmp_path_factory):
    from app.main import build_app
    from app.settings import AppSettings
    root = tmp_path_factory.mktemp("hostile")
    s = AppSettings(data_dir=root / "datasets", runs_dir=root / "runs", adapters_dir=root / "adapters",
                    base_model=str(tiny_model_dir), import_dirs=(root,))
    return s, build_app(s), root


def press_generate(demo, model: str, slots: list[tuple[str, float, bool]], guidance: float = 3.0) -> list:
    """The Generate button's handler with the page's values: 4 slots, the prompt and the image settings."""
    fn = wired(demo, "gen-btn")
    values = []
    for path, weight, on in (slots + [("", 1.0, True)] * 4)[:4]:
        values += [path or None, weight, on]
    out = fn.fn(no_progress, model, *values, "a red square", "", 3, 2, guidance, 64, 64, 1)
    return asyncio.run(demo.postprocess_data(fn, out, None))  # what the browser receives


def gallery_pixels(shown) -> np.ndarray:
    from PIL import Image
    images = shown.root if hasattr(shown, "root") else shown
    paths = [item.image.path if hasattr(item, "image") else item["image"]["path"] for item in images]
    return np.stack([np.asarray(Image.open(p), dtype=np.int16) for p in paths])


def status_of(shown) -> str:
    return json.dumps(shown[1], default=str, ensure_ascii=False)


# ---- item 2: one adapter in two slots -----------------------------------------------------------------------------

def test_the_same_adapter_in_two_slots_adds_its_weights(app):
    s, demo, root = app
    a = write_adapter(root / "twice.safetensors", seed=5)
    once = press_generate(demo, s.base_model, [(str(a), 1.0, True)])
    twice = press_generate(demo, s.base_model, [(str(a), 0.5, True), (str(a), 0.5, True)])
    assert "⚠" not in status_of(twice), status_of(twice)
    assert np.array_equal(gallery_pixels(twice[0]), gallery_pixels(once[0]))
    off = press_generate(demo, s.base_model, [(str(a), 1.0, True), (str(a), 0.7, False)])  # off adds nothing
    assert np.array_equal(gallery_pixels(off[0]), gallery_pixels(once[0]))
    assert str(root) not in json.dumps(off, default=str)


# ---- item 7: Generate starts where the samples are ----------------------------------------------------------------

def test_generate_starts_from_the_base_models_sampling_defaults(tmp_path):
    from app.main import build_app
    from app.settings import AppSettings
    from trainer import default_config
    cfg = default_config("")  # the built-in tiny model
    demo = build_app(AppSettings(data_dir=tmp_path / "d", runs_dir=tmp_path / "r", adapters_dir=tmp_path / "a",
                                 base_model=""))
    shown = {key: block(demo, f"gen-{key}").value for key in ("guidance", "steps", "width", "height", "seed",
                                                              "negative")}
    assert shown == {"guidance": cfg.sampling.guidance, "steps": cfg.sampling.steps,
                     "width": cfg.dataset.resolution, "height": cfg.dataset.resolution, "seed": cfg.sampling.seed,
                     "negative": cfg.sampling.negative_prompt}
    assert cfg.sampling.guidance == 4.0  # what the tiny model's samples are drawn at (presets/tiny-demo.toml)


def test_samples_are_on_by_default_and_follow_the_base_model():
    from trainer import TrainConfig, default_config
    assert TrainConfig().sampling.every_n_steps > 0
    tiny = default_config("")
    assert 0 < tiny.sampling.every_n_steps < tiny.schedule.max_steps  # a short run still shows its samples


def test_a_new_base_model_in_generate_brings_its_sampling_defaults(app, tmp_path):
    from trainer import default_config
    s, demo, _ = app
    fn = wired(demo, "gen-model", "blur")
    out = fn.fn("", s.base_model)  # the box changed from the test model to the built-in tiny one
    cfg = default_config("")
    shown = asyncio.run(demo.postprocess_data(fn, out, None))
    assert cfg.sampling.guidance in shown and cfg.sampling.steps in shown and cfg.dataset.resolution in shown


# ---- item 9: non-finite weights and guidance ----------------------------------------------------------------------

@pytest.mark.parametrize("weight", ["nan", "inf"])
def test_blend_refuses_a_non_finite_weight(tmp_path, weight):
    a = write_adapter(tmp_path / "a.safetensors", seed=1)
    err = one_line_error(cli("blend", f"{a}:{weight}", "--out", tmp_path / "b.safetensors", cwd=tmp_path))
    assert "a.safetensors" in err and f"is {weight}" in err and "finite" in err, err
    assert not (tmp_path / "b.safetensors").exists()


def test_generate_refuses_a_non_finite_weight_or_guidance(tiny_model_dir, tmp_path):
    a = write_adapter(tmp_path / "a.safetensors", seed=1)
    common = ["generate", "--model", tiny_model_dir, "--prompt", "x", "--steps", "1", "--out", tmp_path / "x.png"]
    err = one_line_error(cli(*common, "--lora", f"{a}:nan", cwd=tmp_path))
    assert "a.safetensors" in err and "is nan" in err and "finite" in err, err
    err = one_line_error(cli(*common, "--guidance", "nan", cwd=tmp_path))
    assert "--guidance" in err and "finite" in err, err
    assert not (tmp_path / "x.png").exists()


def test_the_app_refuses_a_non_finite_guidance_or_weight(app):
    s, demo, root = app
    a = write_adapter(root / "w.safetensors", seed=6)
    for guidance, weight, named in ((math.nan, 1.0, "Guidance"), (3.0, math.inf, "w.safetensors")):
        shown = press_generate(demo, s.base_model, [(str(a), weight, True)], guidance=guidance)
        status = status_of(shown)
        assert "⚠" in status and named in status and "finite" in status, status
        assert str(root) not in status


# ---- item 10: adapters that cannot work ---------------------------------------------------------------------------

def upload(demo, s, path: Path) -> str:
    fn = wired(demo, "adapter-upload", "upload")
    return json.dumps(fn.fn(str(path), s.base_model), default=str)


def test_integer_tensors_are_refused_by_blend_generate_and_upload(app, tiny_model_dir, tmp_path):
    s, demo, _ = app
    ints = raw_adapter(tmp_path / "ints.safetensors", kohya_tensors(dtype=torch.int64))
    err = one_line_error(cli("blend", ints, "--out", tmp_path / "b.safetensors", cwd=tmp_path))
    assert "ints.safetensors" in err and "integer" in err, err
    err = one_line_error(cli("generate", "--model", tiny_model_dir, "--lora", ints, "--prompt", "x", "--steps", "1",
                             "--out", tmp_path / "x.png", cwd=tmp_path))
    assert "ints.safetensors" in err and "integer" in err, err
    shown = upload(demo, s, ints)
    assert "ints.safetensors" in shown and "integer" in shown, shown
    assert not (tmp_path / "b.safetensors").exists() and not (tmp_path / "x.png").exists()
    assert not list(Path(s.adapters_dir).glob("ints*"))


def test_an_adapter_whose_alphas_are_all_zero_is_refused(app, tmp_path):
    s, demo, _ = app
    zero = raw_adapter(tmp_path / "zero.safetensors", kohya_tensors(alpha=0.0))
    err = one_line_error(cli("blend", zero, "--out", tmp_path / "b.safetensors", cwd=tmp_path))
    assert "zero.safetensors" in err and "alpha" in err, err
    shown = upload(demo, s, zero)
    assert "zero.safetensors" in shown and "alpha" in shown, shown
    assert not list(Path(s.adapters_dir).glob("zero*"))


def test_an_alpha_too_small_to_train_is_refused_by_validate_and_the_form(tmp_path):
    from app import forms as F
    from app.settings import AppSettings
    from app.tabs import train as tab
    from trainer import field_info
    result = cli("validate", "--config", ROOT / "presets" / "tiny-demo.toml", "--set", "network.alpha=1e-30",
                 cwd=ROOT)
    err = result.stderr
    assert result.returncode == 2 and "Traceback" not in err, err  # validate lists every problem, one a line
    err, = [line for line in err.splitlines() if "network.alpha" in line]
    minimum = field_info("network.alpha").min
    assert "network.alpha" in err and minimum and f"{minimum:g}" in err, err
    s = AppSettings(data_dir=tmp_path / "d", runs_dir=tmp_path / "runs", base_model="")
    cfg = tab.initial_config(s)
    cfg.network.alpha = 1e-30
    errors, _ = tab.check_form(s, F.config_to_values(cfg))
    assert "network.alpha" in errors and f"{minimum:g}" in errors["network.alpha"], errors


# ---- item 11: one family check ------------------------------------------------------------------------------------

def sd1_and_sdxl(folder: Path) -> tuple[Path, Path]:
    sd1 = raw_adapter(folder / "sd1.safetensors", kohya_tensors(seed=1), {"ss_base_model_version": "sd_v1"})
    sdxl = save_adapter(Adapter({SDXL_LAYER: LoraLayer(torch.ones(2, 8), torch.ones(8, 2), 2.0)}),
                        folder / "sdxl.safetensors", dtype="fp32")
    return sd1, sdxl


def test_blend_refuses_adapters_of_two_families(tmp_path):
    sd1, sdxl = sd1_and_sdxl(tmp_path)
    err = one_line_error(cli("blend", sd1, sdxl, "--out", tmp_path / "mix.safetensors", cwd=tmp_path))
    assert "sd1" in err and "sdxl" in err and "Stable Diffusion 1.x" in err and "SDXL" in err, err
    assert str(tmp_path) not in err.replace(str(tmp_path / "mix.safetensors"), "")
    assert not (tmp_path / "mix.safetensors").exists()


def test_resize_and_blend_refuse_a_file_whose_metadata_and_layers_disagree(tmp_path):
    _, sdxl = sd1_and_sdxl(tmp_path)
    liar = raw_adapter(tmp_path / "liar.safetensors", {
        f"{SDXL_LAYER}.lora_down.weight": torch.ones(2, 8), f"{SDXL_LAYER}.lora_up.weight": torch.ones(8, 2),
        f"{SDXL_LAYER}.alpha": torch.tensor(2.0)}, {"ss_base_model_version": "sd_v1"})
    for argv in (("resize", liar, "--rank", "1", "--out", tmp_path / "r.safetensors"),
                 ("blend", liar, sdxl, "--out", tmp_path / "r.safetensors")):
        err = one_line_error(cli(*argv, cwd=tmp_path))
        assert "liar.safetensors" in err and "Stable Diffusion 1.x" in err and "SDXL" in err, err
    assert not (tmp_path / "r.safetensors").exists()


def test_generate_refuses_an_adapter_of_another_family_with_the_bake_check(tiny_model_dir, tmp_path):
    _, sdxl = sd1_and_sdxl(tmp_path)
    err = one_line_error(cli("generate", "--model", tiny_model_dir, "--lora", sdxl, "--prompt", "x", "--steps", "1",
                             "--out", tmp_path / "x.png", cwd=tmp_path))
    assert "made for SDXL" in err and "sdxl.safetensors" in err and str(tmp_path / "sdxl") not in err, err


# ---- the review's findings: the toolkit's OS errors and every seed ------------------------------------------------

def test_a_toolkit_command_that_cannot_write_says_so_with_the_fix(tmp_path):
    """Item 14 for blend, resize, bake, generate: '[Errno 20] Not a directory' was printed as the OS said it."""
    a = raw_adapter(tmp_path / "a.safetensors", kohya_tensors())
    (tmp_path / "file.txt").write_text("a file, not a folder")
    line = one_line_error(cli("blend", f"{a}:1", "--out", tmp_path / "file.txt" / "ab.safetensors", cwd=tmp_path))
    assert "[Errno" not in line and "cannot write" in line and "file.txt" in line and "rename or remove" in line, line


@pytest.mark.parametrize("key", ["run.seed", "sampling.seed"])
def test_every_seed_of_the_config_is_bounded(tmp_path, key):
    """sampling.seed (samples are on by default) went to torch.manual_seed unbounded: an overflow at the first
    sample, after validate passed."""
    result = cli("validate", "--config", ROOT / "presets" / "tiny-demo.toml", "--set",
                 f"{key}=99999999999999999999999", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"{key} is 99999999999999999999999; it must be at most 4294967295" in result.stderr, result.stderr


def test_generate_refuses_a_seed_torch_cannot_take(tmp_path):
    line = one_line_error(cli("generate", "--model", "", "--prompt", "x", "--seed",
                              "99999999999999999999999", "--out", tmp_path / "x.png", cwd=tmp_path))
    assert "seed" in line and "4294967295" in line and not (tmp_path / "x.png").exists(), line
