"""Fused blending, exact and SVD merges, resize, the Generator and the adapter CLI, on the tiny SD components."""
from __future__ import annotations

import os

import pytest
import torch

from trainer.formats import load_adapter, module_index, save_adapter
from trainer.adapters.blend import FusedBlender
from trainer.adapters.merge import merge_exact, merge_svd
from trainer.adapters.resize import resize
from trainer.lora_state import Adapter, LoraLayer

Q = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
K = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
V = "lora_unet_up_blocks_0_attentions_1_transformer_blocks_0_attn1_to_v"
PROJ_IN = "lora_unet_down_blocks_1_attentions_0_proj_in"
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"  # 3x3 conv: a LoCon-style layer
TE_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
TE_FC = "lora_te_text_model_encoder_layers_1_mlp_fc1"


@pytest.fixture
def model():
    from tiny import tiny_components
    parts = tiny_components()
    parts["index"] = module_index(parts["unet"], {"lora_te": parts["text_encoder"]})
    return parts


def random_adapter(index: dict, names: list[str], rank: int = 4, seed: int = 0, true_rank: int | None = None,
                   alpha: float | None = None) -> Adapter:
    """Random non-zero factors in each named module's shape; `true_rank` < rank makes every delta rank-deficient."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name in names:
        weight = index[name][2].weight
        out, fan_in = weight.shape[0], weight[0].numel()
        down = torch.randn(rank, fan_in, generator=g) / fan_in ** 0.5
        if true_rank is not None:
            down = torch.randn(rank, true_rank, generator=g) @ torch.randn(true_rank, fan_in, generator=g) / fan_in
        up = torch.randn(out, rank, generator=g) * 0.1
        if weight.dim() == 4:
            down, up = down.reshape(rank, *weight.shape[1:]), up[:, :, None, None]
        layers[name] = LoraLayer(down, up, float(rank) / 2 if alpha is None else alpha)
    return Adapter(layers, {"ss_output_name": f"random-{seed}"})


def snapshot(parts) -> dict[str, torch.Tensor]:
    state = {f"unet.{k}": v.clone() for k, v in parts["unet"].state_dict().items()}
    state.update({f"te.{k}": v.clone() for k, v in parts["text_encoder"].state_dict().items()})
    return state


def current(parts) -> dict[str, torch.Tensor]:
    state = {f"unet.{k}": v for k, v in parts["unet"].state_dict().items()}
    state.update({f"te.{k}": v for k, v in parts["text_encoder"].state_dict().items()})
    return state


def two_adapters(index):
    a = random_adapter(index, [Q, K, CONV, TE_Q, PROJ_IN], rank=4, seed=1)
    b = random_adapter(index, [Q, V, CONV, TE_FC], rank=3, seed=2)
    return a, b


# ---- blending ------------------------------------------------------------------------------------------------------

def test_blend_is_the_weighted_sum_of_scaled_deltas(model):
    index = model["index"]
    a, b = two_adapters(index)
    w0 = snapshot(model)
    blender = FusedBlender(model["unet"], {"lora_te": model["text_encoder"]})
    blender.add("a", a, 0.7)
    blender.add("b", b, -0.3)
    assert blender.active() == {"a": 0.7, "b": -0.3}
    for name in set(a.layers) | set(b.layers):
        expected = torch.zeros_like(index[name][2].weight)
        for adapter, w in ((a, 0.7), (b, -0.3)):
            if name in adapter.layers:
                expected += w * adapter.layers[name].delta().reshape(expected.shape)
        assert torch.allclose(blender.blended_delta(name), expected, atol=1e-5)
        weight = index[name][2].weight
        assert expected.abs().max() > 1e-3  # the test would see a missing delta
        assert torch.allclose(weight - _w0_of(w0, index, name), expected, atol=1e-5)
    untouched = [k for k in w0 if not any(k == _param_key(index, n) for n in set(a.layers) | set(b.layers))]
    assert untouched and all(torch.equal(w0[k], current(model)[k]) for k in untouched)


def _param_key(index, name):
    prefix, path, _ = index[name]
    return f"{'unet' if prefix == 'lora_unet' else 'te'}.{path}.weight"


def _w0_of(w0, index, name):
    return w0[_param_key(index, name)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_removal_restores_w0_bit_for_bit(model, dtype):
    model["unet"].to(dtype)
    model["text_encoder"].to(dtype)
    a, b = two_adapters(model["index"])
    w0 = snapshot(model)
    blender = FusedBlender(model["unet"], {"lora_te": model["text_encoder"]})
    blender.add("a", a, 0.7)
    blender.add("b", b, -0.3)
    blender.set_weight("a", 1.3)
    blender.remove("a")
    only_b = snapshot(model)
    blender.remove("b")
    assert all(torch.equal(w0[k], v) for k, v in current(model).items())
    assert blender.touched_layers() == []
    # the state after removing a is exactly a fresh blend of b alone (recomputed from W0, never subtracted)
    blender.add("b", b, -0.3)
    assert all(torch.equal(only_b[k], v) for k, v in current(model).items())
    blender.clear()
    assert all(torch.equal(w0[k], v) for k, v in current(model).items())
    if dtype == torch.float16:  # why restoring from a copy matters: subtracting the delta again is not exact
        weight = w0[_param_key(model["index"], Q)].float()
        delta = 0.7 * a.layers[Q].delta()
        assert not torch.equal(((weight + delta).half().float() - delta).half(), weight.half())


def test_changing_one_weight_touches_only_that_adapters_layers(model):
    index = model["index"]
    a, b = two_adapters(index)
    blender = FusedBlender(model["unet"], {"lora_te": model["text_encoder"]})
    blender.add("a", a, 0.7)
    blender.add("b", b, -0.3)
    params = {name: module.weight for name, (_, _, module) in index.items()}
    versions = {name: p._version for name, p in params.items()}
    before = {name: p.detach().clone() for name, p in params.items()}
    blender.set_weight("b", 0.5)
    changed = {name for name, p in params.items() if p._version != versions[name]}
    assert changed == set(b.layers)
    assert all(torch.equal(before[n], params[n]) for n in params if n not in b.layers)
    assert not torch.equal(before[V], params[V])
    blender.set_weight("b", 0.5)  # no change: no write at all
    assert all(params[n]._version == versions[n] + (n in b.layers) for n in params)


def test_enable_disable_and_negative_weights(model):
    index = model["index"]
    a, b = two_adapters(index)
    w0 = snapshot(model)
    blender = FusedBlender(model["unet"], {"lora_te": model["text_encoder"]})
    blender.add("a", a, -1.0)
    blender.add("b", b, 0.4, enabled=False)
    assert blender.active() == {"a": -1.0}
    assert torch.equal(index[V][2].weight, _w0_of(w0, index, V))  # only b touches V, and b is off
    expected_q = _w0_of(w0, index, Q) - a.layers[Q].delta()
    assert torch.allclose(index[Q][2].weight, expected_q, atol=1e-6)
    blender.set_weight("b", 0.9)  # disabled: no layer is rewritten
    assert torch.equal(index[V][2].weight, _w0_of(w0, index, V))
    blender.set_enabled("b", True)
    assert torch.allclose(index[V][2].weight - _w0_of(w0, index, V), 0.9 * b.layers[V].delta(), atol=1e-6)
    blender.set_enabled("a", False)
    blender.set_enabled("b", False)
    assert all(torch.equal(w0[k], v) for k, v in current(model).items())


def test_add_rejects_layers_the_model_lacks_and_wrong_shapes(model):
    blender = FusedBlender(model["unet"], {"lora_te": model["text_encoder"]})
    foreign = Adapter({"lora_unet_input_blocks_4_1_proj_in": LoraLayer(torch.zeros(2, 8), torch.zeros(8, 2), 2.0)})
    with pytest.raises(ValueError, match="input_blocks_4_1_proj_in"):
        blender.add("sdxl", foreign)
    wrong = Adapter({Q: LoraLayer(torch.zeros(2, 7), torch.zeros(64, 2), 2.0)})
    with pytest.raises(ValueError, match="does not fit"):
        blender.add("wrong", wrong)
    with pytest.raises(KeyError, match="no adapter named"):
        blender.set_weight("missing", 1.0)
    assert blender.names() == []


# ---- merging -------------------------------------------------------------------------------------------------------

def test_exact_merge_stacks_ranks_and_reproduces_the_blend(model, tmp_path):
    index = model["index"]
    a, b = two_adapters(index)
    blender = FusedBlender(model["unet"], {"lora_te": model["text_encoder"]})
    blender.add("a", a, 0.7)
    blender.add("b", b, -0.3)
    merged = merge_exact([(a, 0.7), (b, -0.3)], titles=["a", "b"])
    assert set(merged.layers) == set(a.layers) | set(b.layers)
    assert merged.layers[Q].rank == 7 and merged.layers[K].rank == 4 and merged.layers[V].rank == 3
    assert merged.layers[Q].scale == 1.0
    save_adapter(merged, tmp_path / "merged.safetensors", dtype="fp32")
    loaded = load_adapter(tmp_path / "merged.safetensors")
    for name, layer in loaded.layers.items():
        target = blender.blended_delta(name)
        assert torch.allclose(layer.delta().reshape(target.shape), target, atol=1e-5), name
    # averaging the factors instead would be wrong by the cross terms: make sure the test can tell
    avg = (0.7 * a.layers[Q].up[:, :3] + -0.3 * b.layers[Q].up) @ (a.layers[Q].down[:3] + b.layers[Q].down)
    assert not torch.allclose(avg, blender.blended_delta(Q), atol=1e-3)


def test_svd_merge_reports_the_kept_norm(model):
    index = model["index"]
    a, b = two_adapters(index)
    exact = merge_exact([(a, 0.7), (b, -0.3)])
    full, report = merge_svd([(a, 0.7), (b, -0.3)], rank=16)
    assert report["kept_overall"] == pytest.approx(1.0, abs=1e-9)
    for name, layer in full.layers.items():
        assert torch.allclose(layer.delta(), exact.layers[name].delta(), atol=1e-5)
    small, report = merge_svd([(a, 0.7), (b, -0.3)], rank=2)
    assert all(layer.rank == 2 for layer in small.layers.values())
    s = torch.linalg.svdvals(exact.layers[Q].delta().double())
    assert report["layers"][Q]["kept"] == pytest.approx(float(s[:2].square().sum().sqrt() / s.norm()), rel=1e-6)
    assert 0.3 < report["kept_overall"] < 1.0
    residual = (small.layers[Q].delta() - exact.layers[Q].delta()).norm()
    assert residual == pytest.approx(float(s[2:].norm()), rel=1e-4)  # Eckart-Young: the best rank-2 fit


# ---- resizing ------------------------------------------------------------------------------------------------------

def test_resize_to_own_rank_keeps_everything(model):
    a = random_adapter(model["index"], [Q, K, CONV, TE_Q], rank=4, seed=3)
    resized, report = resize(a, rank=4)
    assert report["kept_overall"] == pytest.approx(1.0, abs=1e-9)
    assert all(v["kept"] == pytest.approx(1.0, abs=1e-9) and v["rank"] == 4 for v in report["layers"].values())
    for name, layer in resized.layers.items():
        assert layer.down.shape == a.layers[name].down.shape and layer.up.shape == a.layers[name].up.shape
        assert torch.allclose(layer.delta(), a.layers[name].delta(), atol=1e-5)


def test_resize_finds_the_true_rank(model):
    a = random_adapter(model["index"], [Q, K, CONV, TE_Q], rank=8, seed=4, true_rank=3)
    resized, report = resize(a, rank=3)
    assert all(v["kept"] > 1 - 1e-9 for v in report["layers"].values())
    for name, layer in resized.layers.items():
        assert torch.allclose(layer.delta(), a.layers[name].delta(), atol=1e-5)
    by_share, report = resize(a, keep=0.999)
    assert {v["rank"] for v in report["layers"].values()} == {3}
    assert report["parameters_after"] * 8 == report["parameters_before"] * 3
    _, report = resize(a, rank=2)
    assert all(v["kept"] < 0.999 for v in report["layers"].values())


def test_resize_rejects_bad_arguments(model):
    a = random_adapter(model["index"], [Q], rank=4)
    for kwargs in ({}, {"rank": 2, "keep": 0.9}, {"rank": 0}, {"keep": 1.5}):
        with pytest.raises(ValueError):
            resize(a, **kwargs)


# ---- CLI -----------------------------------------------------------------------------------------------------------

def test_parse_weighted_keeps_windows_drive_colons():
    from trainer.adapters.cli import parse_weighted
    assert parse_weighted("a.safetensors:0.7") == ("a.safetensors", 0.7)
    assert parse_weighted("b.safetensors:-0.3") == ("b.safetensors", -0.3)
    assert parse_weighted("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_weighted(r"C:\loras\a.safetensors") == (r"C:\loras\a.safetensors", 1.0)
    assert parse_weighted(r"C:\loras\a.safetensors:1e-1") == (r"C:\loras\a.safetensors", 0.1)


def test_cli_blend_and_resize(model, tmp_path, capsys):
    from trainer.adapters.cli import main
    a, b = two_adapters(model["index"])
    save_adapter(a, tmp_path / "a.safetensors", dtype="fp32")
    save_adapter(b, tmp_path / "b.safetensors", dtype="fp32")
    out = tmp_path / "c.safetensors"
    assert main(["blend", f"{tmp_path / 'a.safetensors'}:0.7", f"{tmp_path / 'b.safetensors'}:-0.3",
                 "--out", str(out), "--dtype", "fp32"]) == 0
    expected = merge_exact([(a, 0.7), (b, -0.3)])
    merged = load_adapter(out)
    assert torch.allclose(merged.layers[Q].delta(), expected.layers[Q].delta(), atol=1e-5)
    assert main(["blend", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--rank", "2",
                 "--out", str(out), "--report", str(tmp_path / "r.json")]) == 0
    assert load_adapter(out).layers[Q].rank == 2 and (tmp_path / "r.json").is_file()
    assert main(["resize", str(tmp_path / "a.safetensors"), "--keep", "0.95", "--out", str(out)]) == 0
    assert "kept" in capsys.readouterr().out
    assert main(["resize", str(tmp_path / "missing.safetensors"), "--rank", "2", "--out", str(out)]) == 2
    assert "missing.safetensors does not exist" in capsys.readouterr().err
    assert main(["resize", str(tmp_path / "a.safetensors"), "--keep", "1.5", "--out", str(out)]) == 2
    assert "keep must be in (0, 1]" in capsys.readouterr().err


def test_cli_bugs_keep_their_traceback(model, tmp_path, monkeypatch, capsys):
    """Only the project's user-facing errors become exit 2; a ValueError or KeyError from a bug propagates."""
    import importlib
    from trainer.adapters import cli
    resize = importlib.import_module("trainer.adapters.resize")  # the module, not the function of that name
    a, _ = two_adapters(model["index"])
    save_adapter(a, tmp_path / "a.safetensors", dtype="fp32")
    argv = ["resize", str(tmp_path / "a.safetensors"), "--rank", "2", "--out", str(tmp_path / "b.safetensors")]
    for bug in (KeyError("lora_up"), ValueError("bad reshape")):
        def broken(*args, bug=bug, **kwargs):
            raise bug
        monkeypatch.setattr(resize, "resize", broken)
        with pytest.raises(type(bug)):
            cli.main(argv)
    out = str(tmp_path / "c.safetensors")
    assert cli.main(["blend", str(tmp_path / "a.safetensors"), "--rank", "0", "--out", out]) == 2
    assert "--rank must be at least 1" in capsys.readouterr().err
    assert cli.main(["blend", str(tmp_path / "a.safetensors"), "--out", str(tmp_path / "c.lora")]) == 2
    assert "--out" in capsys.readouterr().err


# ---- generation ----------------------------------------------------------------------------------------------------

def test_generator_blends_caches_and_exports(tiny_model_dir, tmp_path):
    from trainer.adapters.generate import Generator
    gen = Generator(str(tiny_model_dir))
    index = module_index(gen.base.denoiser, gen.base.text_encoders)
    a = random_adapter(index, [Q, K, V, TE_Q], rank=4, seed=5)
    path = tmp_path / "a.safetensors"
    save_adapter(a, path, dtype="fp32")
    base_images = gen.generate("a red square", seed=1, steps=2, num_images=2)
    assert _same(base_images[1], gen.generate("a red square", seed=2, steps=2)[0])  # image k uses seed + k
    gen.set_adapters([(path, 2.0, True)])
    assert not _same(gen.generate("a red square", seed=1, steps=2)[0], base_images[0])
    loaded = gen.blender.adapter(str(path.resolve()))
    gen.set_adapters([(path, 0.5, True)])
    assert gen.blender.adapter(str(path.resolve())) is loaded  # same file, same mtime: not re-read
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    gen.set_adapters([(path, 0.5, True)])
    assert gen.blender.adapter(str(path.resolve())) is not loaded
    exported = tmp_path / "blend.safetensors"
    assert gen.export_blend(exported, dtype="fp32") is None
    assert torch.allclose(load_adapter(exported).layers[Q].delta(), 0.5 * a.layers[Q].delta(), atol=1e-5)
    grid = gen.comparison_grid("a red square", [0.0, 1.0], seeds=[1], steps=2)
    w, h = base_images[0].size
    assert grid.size[1] == 18 + 2 * h and grid.size[0] > w
    assert _same(grid.crop((grid.size[0] - w, 18, grid.size[0], 18 + h)), base_images[0])  # weight 0 = base
    assert gen.blender.active() == {str(path.resolve()): 0.5}  # the grid put the weight back
    grid = gen.comparison_grid("a red square", [path], seeds=[1], steps=2)
    assert grid.size[1] == 18 + h
    gen.set_adapters([(path, 0.5, False)])  # a switched-off adapter can still be the grid's subject
    gen.comparison_grid("a red square", [1.0], seeds=[1], steps=2, adapter=str(path.resolve()))
    assert gen.blender.active() == {} and gen.blender.weight(str(path.resolve())) == 0.5
    gen.set_adapters([])
    assert _same(gen.generate("a red square", seed=1, steps=2)[0], base_images[0])


def _same(x, y) -> bool:
    import numpy as np
    return np.array_equal(np.asarray(x), np.asarray(y))


def test_cli_generate(tiny_model_dir, tmp_path, capsys):
    from trainer.adapters.cli import main
    out = tmp_path / "img.png"
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "a blue circle", "--seed", "3",
                 "--steps", "2", "--out", str(out)]) == 0
    from PIL import Image
    assert Image.open(out).size[0] > 0
    assert main(["generate", "--model", str(tiny_model_dir), "--lora", str(tmp_path / "nope.safetensors:0.5"),
                 "--prompt", "x", "--out", str(out)]) == 2
    assert "nope.safetensors does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("flags, named", [(["--width", "33"], "--width"), (["--height", "4"], "--height"),
                                          (["--width", "0"], "--width"), (["--steps", "0"], "--steps"),
                                          (["--num-images", "0"], "--num-images")])
def test_cli_generate_refuses_bad_sizes_and_counts(tiny_model_dir, tmp_path, capsys, flags, named):
    from trainer.adapters.cli import main
    out = tmp_path / "img.png"
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "x", "--steps", "2", *flags,
                 "--out", str(out)]) == 2
    assert named in capsys.readouterr().err and not out.exists()


def test_cli_generate_fills_a_missing_side_with_the_native_size(tiny_model_dir, tmp_path):
    from PIL import Image
    from trainer.adapters.cli import main
    from trainer.models import load_base_model
    base = load_base_model(str(tiny_model_dir))
    native = base.denoiser.config.sample_size * 2 ** (len(base.vae.config.block_out_channels) - 1)
    out = tmp_path / "img.png"
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "x", "--steps", "1", "--width", "24",
                 "--num-images", "2", "--out", str(out)]) == 0
    assert [Image.open(tmp_path / f"img-{k}.png").size for k in (1, 2)] == [(24, native)] * 2
