"""Generate tab handlers, called directly against the tiny model: slots, weights, grids, uploads, exports."""
from pathlib import Path

import numpy as np
import pytest
import torch

from app import device
from app import generation as G
from app.files import UploadError
from app.settings import AppSettings
from app.tabs.generate import slots_from
from app.errors import AppError

LAYERS = ["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
          "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_v",
          "lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"]


def write_adapter(path: Path, seed: int = 0, fmt: str = "kohya") -> Path:
    """A strong random rank-2 adapter over three 64-wide attention layers of the tiny UNet."""
    from trainer.formats import save_adapter
    from trainer.lora_state import Adapter, LoraLayer
    g = torch.Generator().manual_seed(seed)
    layers = {n: LoraLayer(torch.randn(2, 64, generator=g), torch.randn(64, 2, generator=g), 2.0) for n in LAYERS}
    return save_adapter(Adapter(layers=layers), path, format=fmt, dtype="fp32")


@pytest.fixture(scope="module")
def env(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    s = AppSettings(data_dir=root / "datasets", runs_dir=root / "runs", adapters_dir=root / "adapters",
                    base_model=str(tiny_model_dir), import_dirs=(root,))  # the test adapters lie in root
    return s, write_adapter(root / "a.safetensors", seed=1), write_adapter(root / "b.safetensors", seed=2)


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


def gen(s, slots, seed=3, n=1):
    return G.generate(s, s.base_model, slots, "a red square", seed=seed, steps=2, guidance=3.0, width=64, height=64,
                      num_images=n)


def test_weights_and_toggles_change_the_images_and_zero_is_the_base_model(env):
    s, a, b = env
    base = pixels(gen(s, []))
    at_one = pixels(gen(s, [G.Slot(str(a), 1.0)]))
    assert base.shape == (1, 64, 64, 3)
    assert np.abs(at_one - base).mean() > 1
    assert np.array_equal(pixels(gen(s, [G.Slot(str(a), 0.0)])), base)
    assert np.array_equal(pixels(gen(s, [G.Slot(str(a), 1.0, enabled=False)])), base)
    both = pixels(gen(s, [G.Slot(str(a), 1.0), G.Slot(str(b), -0.5), G.Slot("", 1.0)]))
    assert not np.array_equal(both, at_one)
    assert len(gen(s, [], n=2)) == 2


def test_the_generator_is_loaded_once_per_base_model(env):
    s, a, _ = env
    first = device.get_generator(s.base_model)
    gen(s, [G.Slot(str(a), 1.0)])
    assert device.get_generator(s.base_model) is first


def test_slots_from_widget_values():
    slots = slots_from(["/x.safetensors", 0.5, True, None, 1, False])
    assert slots == [G.Slot("/x.safetensors", 0.5, True), G.Slot("", 1.0, False)]


def test_comparison_grid_rows_by_weight_and_by_checkpoint(env):
    s, a, b = env
    grid = G.comparison_grid(s, s.base_model, [G.Slot(str(a), 1.0)], "a red square", [0.0, 1.0], [1, 2], steps=2,
                             width=64, height=64)
    assert grid.size[0] > 2 * 64 and grid.size[1] > 2 * 64
    grid = G.comparison_grid(s, s.base_model, [], "a red square", [str(a), str(b)], [1], steps=2, width=64,
                             height=64)
    assert grid.size[1] > 2 * 64
    with pytest.raises(AppError, match="at least one row"):
        G.comparison_grid(s, s.base_model, [], "p", [], [1])
    assert G.parse_numbers("0, 0.5;1") == [0.0, 0.5, 1.0]
    with pytest.raises(AppError, match="'x' is not a number"):
        G.parse_numbers("1, x")


def test_uploaded_adapters_are_checked_kept_and_listed(env, tmp_path):
    s, a, _ = env
    diffusers_file = write_adapter(tmp_path / "my lora.safetensors", seed=3, fmt="diffusers")
    saved = G.add_adapter_upload(s, str(diffusers_file))
    assert saved.parent == s.adapters_dir and saved.name == "my lora.safetensors"
    assert ("uploaded: my lora.safetensors", str(saved)) in G.adapter_choices(s)
    assert G.add_adapter_upload(s, str(diffusers_file)).name == "my lora-2.safetensors"  # no overwrite
    (tmp_path / "junk.safetensors").write_bytes(b"garbage")
    with pytest.raises(UploadError, match="junk.safetensors could not be used as a LoRA adapter"):
        G.add_adapter_upload(s, str(tmp_path / "junk.safetensors"))
    with pytest.raises(UploadError, match="not a .safetensors file"):
        G.add_adapter_upload(s, str(tmp_path / "x.ckpt"))


def test_export_blend_writes_one_adapter_of_the_enabled_slots(env):
    from trainer.formats import load_adapter
    s, a, b = env
    out = G.export_blend(s, s.base_model, [G.Slot(str(a), 0.5), G.Slot(str(b), 1.0, enabled=False)])
    blend, single = load_adapter(out), load_adapter(a)
    name = LAYERS[0]
    assert torch.allclose(blend.layers[name].delta().float(), 0.5 * single.layers[name].delta().float(), atol=1e-2)
    with pytest.raises(AppError, match="Enable at least one adapter"):
        G.export_blend(s, s.base_model, [G.Slot(str(a), 0.0)])


def test_generation_needs_a_prompt(env):
    s, _, _ = env
    with pytest.raises(AppError, match="Type a prompt"):
        G.generate(s, s.base_model, [], "  ")


def test_starting_a_training_frees_the_cached_models(env):
    s, _, _ = env
    first = device.get_generator(s.base_model)
    device.release_models()
    assert device.get_generator(s.base_model) is not first


def test_long_actions_report_progress(env):
    """The comparison grid, the analysis and a first generation (the model load) show progress, not a bare timer."""
    from app.main import build_app
    s, _, _ = env
    demo = build_app(s)
    tracked = {}
    for fn in demo.fns.values():
        for target, _ in fn.targets:
            block = demo.blocks.get(target) if isinstance(target, int) else target
            tracked[getattr(block, "elem_id", None)] = fn.tracks_progress
    assert tracked["gen-btn"] and tracked["grid-btn"] and tracked["analyze-btn"]
    steps = []
    G.generate(s, s.base_model, [], "a red square", steps=3, width=64, height=64,
               progress=lambda share, what: steps.append((round(share, 2), what)))
    assert steps[-3:] == [(0.33, "step 1 of 3"), (0.67, "step 2 of 3"), (1.0, "step 3 of 3")]
