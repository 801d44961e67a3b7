"""The adapter toolkit on every layer type (issue 26 item 6): LoCon (Tucker), LoHa, LoKr and DoRA layers, built by
hand (seeded) on the tiny SD1 model's module names and shapes, go through the fused blend, bake, blend to file,
resize and analyze; each result is checked against the layers' own delta()/applied() (the contract that
tests/test_lycoris_layers.py checks against lycoris-lora)."""
from __future__ import annotations

import pytest
import torch

from test_adapters import CONV, K, Q, TE_FC, TE_Q, V, random_adapter
from test_adapters import model  # noqa: F401 (the tiny SD1 parts fixture)
from trainer.adapters.analyze import analyze, spectrum
from trainer.adapters.blend import FusedBlender
from trainer.adapters.delta import base_weights
from trainer.adapters.merge import merge_exact, merge_svd
from trainer.adapters.resize import resize
from trainer.formats import AdapterFormatError
from trainer.lora_state import Adapter, LohaLayer, LokrLayer, LoraLayer


def _randn(g, *shape, scale=0.1):
    return torch.randn(*shape, generator=g) * scale


def lokr(weight: torch.Tensor, g, rank: int = 2, dora: str | None = None) -> LokrLayer:
    """w1 full [4, 4] kron a rank-`rank` w2 (LyCORIS's factor 4 layout); a conv's w2b flattened, `shape` set."""
    out, fan_in = weight.shape[0], weight[0].numel()
    layer = LokrLayer(w1=_randn(g, 4, 4, scale=1.0), w2a=_randn(g, out // 4, rank), w2b=_randn(g, rank, fan_in // 4),
                      alpha=1.0, shape=tuple(weight.shape))
    return _with_dora(layer, weight, dora)


def loha(weight: torch.Tensor, g, rank: int = 2) -> LohaLayer:
    out, fan_in = weight.shape[0], weight[0].numel()
    w = [_randn(g, *shape, scale=0.5) for shape in ((out, rank), (rank, fan_in), (out, rank), (rank, fan_in))]
    return LohaLayer(*w, alpha=1.0, shape=tuple(weight.shape))


def tucker(weight: torch.Tensor, g, rank: int = 3) -> LoraLayer:
    """LoCon's Tucker form of a k x k conv: 1x1 down and up around a [r, r, k, k] core."""
    out, fan_in, kh, kw = weight.shape
    return LoraLayer(_randn(g, rank, fan_in, 1, 1), _randn(g, out, rank, 1, 1), 2.0, mid=_randn(g, rank, rank, kh, kw))


def dora_lora(weight: torch.Tensor, g, axis: str = "out", rank: int = 3) -> LoraLayer:
    out, fan_in = weight.shape[0], weight[0].numel()
    layer = LoraLayer(_randn(g, rank, fan_in), _randn(g, out, rank), float(rank))
    return _with_dora(layer, weight, axis)


def _with_dora(layer, weight: torch.Tensor, axis: str | None):
    """A magnitude near the adapted weight's norms (as DoRA starts), per output row or per input column."""
    if axis is None:
        return layer
    w = weight.detach().flatten(1) if axis == "out" else weight.detach().transpose(0, 1).flatten(1)
    norm = w.norm(dim=1) * 1.1
    layer.dora_scale = norm.reshape(-1, *[1] * (weight.dim() - 1)) if axis == "out" else norm.reshape(1, -1)
    return layer


def lycoris_adapter(index, seed: int = 0) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    w = {name: index[name][2].weight for name in (Q, K, V, CONV, TE_Q)}
    return Adapter({Q: lokr(w[Q], g), K: loha(w[K], g), CONV: tucker(w[CONV], g), V: lokr(w[V], g, dora="out"),
                    TE_Q: dora_lora(w[TE_Q], g, axis="in")}, {"ss_output_name": f"lycoris-{seed}"})


def _blender(model):
    return FusedBlender(model["unet"], {"lora_te": model["text_encoder"]})


def _w0(index, names):
    return {name: index[name][2].weight.detach().clone() for name in names}


# ---- the fused blend (Generate tab) --------------------------------------------------------------------------------

def test_blending_lokr_with_lora_is_the_sum_of_their_deltas(model):
    index = model["index"]
    g = torch.Generator().manual_seed(3)
    kron = Adapter({Q: lokr(index[Q][2].weight, g), CONV: loha(index[CONV][2].weight, g)})
    lora = random_adapter(index, [Q, K, CONV], rank=4, seed=1)
    w0 = _w0(index, [Q, K, CONV])
    blender = _blender(model)
    blender.add("kron", kron, 0.8)
    blender.add("lora", lora, -0.5)
    for name in (Q, CONV):
        weight = index[name][2].weight
        expected = w0[name] + 0.8 * kron.layers[name].delta().reshape(weight.shape) \
            - 0.5 * lora.layers[name].delta().reshape(weight.shape)
        assert kron.layers[name].delta().abs().max() > 1e-2  # the term matters
        assert torch.allclose(weight, expected, rtol=0, atol=1e-6)  # fp32 rounding only
        assert torch.allclose(blender.blended_delta(name), expected - w0[name], rtol=0, atol=1e-6)
    blender.clear()
    assert all(torch.equal(index[name][2].weight, w0[name]) for name in w0)  # W0 back bit for bit


@pytest.mark.parametrize("make", [lambda w, g: dora_lora(w, g, "out"), lambda w, g: dora_lora(w, g, "in"),
                                  lambda w, g: lokr(w, g, dora="out")], ids=["lora-dora-out", "lora-dora-in",
                                                                             "lokr-dora"])
def test_a_lone_dora_adapter_is_its_applied_weight(model, make):
    index = model["index"]
    layer = make(index[Q][2].weight, torch.Generator().manual_seed(4))
    w0 = _w0(index, [Q])[Q]
    blender = _blender(model)
    for strength in (1.0, 0.6):
        blender.add("dora", Adapter({Q: layer}), strength)
        expected = layer.applied(w0, strength)
        assert not torch.allclose(expected, w0 + strength * layer.delta(), atol=1e-4)  # the rescale matters
        assert torch.allclose(index[Q][2].weight, expected, rtol=0, atol=1e-6)


def test_two_dora_adapters_add_their_changes_on_w0(model):
    index = model["index"]
    g = torch.Generator().manual_seed(5)
    a, b = dora_lora(index[Q][2].weight, g), lokr(index[Q][2].weight, g, dora="out")
    w0 = _w0(index, [Q])[Q]
    blender = _blender(model)
    blender.add("a", Adapter({Q: a}), 0.7)
    blender.add("b", Adapter({Q: b}), 1.2)
    expected = w0 + (a.applied(w0, 0.7) - w0) + (b.applied(w0, 1.2) - w0)
    assert torch.allclose(index[Q][2].weight, expected, rtol=0, atol=1e-6)


def test_blender_refuses_a_typed_layer_that_does_not_fit(model):
    g = torch.Generator().manual_seed(6)
    wrong = Adapter({Q: lokr(torch.zeros(64, 32), g)})  # K's shape under Q's name
    blender = _blender(model)
    with pytest.raises(AdapterFormatError, match="LoKr layer .*does not fit"):
        blender.add("wrong", wrong)
    assert blender.names() == []


def test_bake_fuses_every_type_as_applied(tiny_model_dir):
    from trainer.adapters.bake import fuse_into
    from trainer.models import load_base_model
    base = load_base_model(str(tiny_model_dir))
    index = base.module_index()
    adapter = lycoris_adapter(index, seed=7)
    w0 = _w0(index, adapter.layers)
    fuse_into(base, [(adapter, 1.0)])
    for name, layer in adapter.layers.items():
        assert torch.allclose(index[name][2].weight, layer.applied(w0[name]), rtol=0, atol=1e-6), name


# ---- blend to file, resize -----------------------------------------------------------------------------------------

def test_blend_to_file_is_the_svd_of_the_summed_deltas(model):
    index = model["index"]
    lyco, lora = lycoris_adapter(index, seed=8), random_adapter(index, [Q, K, TE_FC], rank=4, seed=9)
    with pytest.raises(AdapterFormatError, match="--rank"):
        merge_exact([(lyco, 1.0), (lora, 1.0)])
    with pytest.raises(AdapterFormatError, match="base model"):  # V and TE_Q carry DoRA: W0 needed
        merge_svd([(lyco, 0.8), (lora, -0.5)], rank=4)
    base = base_weights(index)
    merged, report = merge_svd([(lyco, 0.8), (lora, -0.5)], rank=4, base=base)
    assert all(isinstance(layer, LoraLayer) and layer.mid is None and layer.dora_scale is None
               for layer in merged.layers.values())
    assert set(merged.layers) == set(lyco.layers) | set(lora.layers)
    assert report["converted"] == {"LoKr": 1, "LoHa": 1, "LoCon (Tucker)": 1, "LoKr + DoRA": 1, "LoRA + DoRA": 1}
    for name in merged.layers:
        w0 = index[name][2].weight.detach()
        total = torch.zeros(w0.shape)
        for adapter, w in ((lyco, 0.8), (lora, -0.5)):
            if name in adapter.layers:
                layer = adapter.layers[name]  # DoRA: its change on W0; else w * delta
                dora = layer.dora_scale is not None
                total += (layer.applied(w0, w) - w0) if dora else w * layer.delta().reshape(w0.shape)
        s = torch.linalg.svdvals(total.flatten(1).double())
        best = (s[:4] ** 2).sum().sqrt() / s.square().sum().sqrt()  # Eckart-Young: the best rank-4 share
        assert report["layers"][name]["kept"] == pytest.approx(float(best), rel=1e-6)
        error = (merged.layers[name].delta().reshape(w0.shape) - total).flatten(1).double().norm()
        assert float(error) == pytest.approx(float(s[4:].square().sum().sqrt()), rel=1e-4, abs=1e-6)


def test_resize_turns_every_type_into_plain_lora(model):
    index = model["index"]
    lyco = lycoris_adapter(index, seed=10)
    full, report = resize(lyco, rank=10_000, base=base_weights(index))
    assert report["kept_overall"] == pytest.approx(1.0, abs=1e-9)
    assert sum(report["converted"].values()) == len(lyco)
    for name, layer in lyco.layers.items():
        w0 = index[name][2].weight.detach()
        target = layer.applied(w0) - w0
        assert torch.allclose(full.layers[name].delta().reshape(w0.shape), target, rtol=0, atol=1e-5), name
    small, report = resize(lyco, keep=0.9, base=base_weights(index))
    assert all(0.9 - 1e-9 <= v["kept"] for v in report["layers"].values())
    assert small.layers[Q].rank < full.layers[Q].rank  # LoKr's kron has rank 4 * 2 = 8: 0.9 needs fewer


def test_resize_of_a_lycoris_layer_without_dora_needs_no_model(model):
    index = model["index"]
    g = torch.Generator().manual_seed(11)
    adapter = Adapter({K: loha(index[K][2].weight, g, rank=2), CONV: tucker(index[CONV][2].weight, g)})
    out, report = resize(adapter, rank=3)
    s = torch.linalg.svdvals(adapter.layers[K].delta().double())
    assert report["layers"][K]["kept"] == pytest.approx(float(s[:3].square().sum().sqrt() / s.norm()), rel=1e-9)
    assert out.layers[CONV].down.shape == (3, 32, 3, 3) and out.layers[CONV].up.shape == (32, 3, 1, 1)


# ---- analyze -------------------------------------------------------------------------------------------------------

def test_spectrum_and_similarity_of_any_type(model, tmp_path):
    index = model["index"]
    lyco = lycoris_adapter(index, seed=12)
    spec = spectrum(lyco)
    for name, layer in lyco.layers.items():
        s = torch.linalg.svdvals(layer.delta(torch.float64).flatten(1))[:len(spec[name]["singular_values"])]
        assert torch.allclose(torch.tensor(spec[name]["singular_values"], dtype=torch.float64), s, rtol=1e-6,
                              atol=1e-9), name
    assert spec[Q]["rank_99"] <= 8  # a kron of a full 4x4 and a rank-2 factor: rank 8 at most
    lora = random_adapter(index, [Q, K, CONV], rank=4, seed=13)
    result = analyze(lyco, tmp_path / "a", lora, layers=[Q])
    assert set(result["similarity"]["per_layer"]) == {Q, K, CONV}
    assert result["similarity"]["per_layer"][CONV]["input_size"] == 32 * 9
    same = analyze(lyco, tmp_path / "b", lyco, layers=[K])
    assert same["similarity"]["per_layer"][K]["phi_1_1"] == pytest.approx(1.0)
    assert (tmp_path / "b" / same["similarity"]["heatmaps"][K]["png"]).is_file()


def test_family_of_a_lycoris_adapter_is_read_from_its_names(model):
    from trainer.models.detect import adapter_family
    lyco = lycoris_adapter(model["index"], seed=14)
    assert adapter_family(lyco).name == adapter_family(random_adapter(model["index"], list(lyco.layers))).name


# ---- the Generate tab's export, the CLI ----------------------------------------------------------------------------

def test_generator_exports_a_lycoris_blend_as_plain_lora(tiny_model_dir, tmp_path):
    from trainer.adapters.generate import Generator
    from trainer.formats import load_adapter
    gen = Generator(str(tiny_model_dir))
    index = gen.base.module_index()
    lyco, lora = lycoris_adapter(index, seed=15), random_adapter(index, [Q, K], rank=4, seed=16)
    gen.set_adapters([(lyco, 0.9, True), (lora, 0.4, True)])
    expected = {name: gen.blender.blended_delta(name) for name in set(lyco.layers) | set(lora.layers)}
    with pytest.raises(AdapterFormatError, match="--rank"):
        gen.export_blend(tmp_path / "exact.safetensors", dtype="fp32")
    report = gen.export_blend(tmp_path / "blend.safetensors", rank=64, dtype="fp32")  # 64: every layer's full rank
    assert report["kept_overall"] == pytest.approx(1.0, abs=1e-9) and "LoKr + DoRA" in report["converted"]
    written = load_adapter(tmp_path / "blend.safetensors")
    for name, delta in expected.items():
        assert torch.allclose(written.layers[name].delta().reshape(delta.shape), delta, rtol=0, atol=1e-5), name


def test_cli_resize_says_lycoris_layers_became_lora(model, tmp_path, capsys, monkeypatch):
    from trainer.adapters import cli
    from trainer.formats import save_adapter
    index = model["index"]
    g = torch.Generator().manual_seed(17)
    lyco = Adapter({K: loha(index[K][2].weight, g), Q: lokr(index[Q][2].weight, g)})
    source = tmp_path / "in.safetensors"
    save_adapter(random_adapter(index, [Q, K]), source)  # a file for the path checks; its layers are lyco's
    monkeypatch.setattr(cli, "_load", lambda path: lyco)
    assert cli.main(["resize", str(source), "--rank", "2", "--out", str(tmp_path / "out.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "LyCORIS layers became plain LoRA (SVD of their deltas): 1 LoHa, 1 LoKr" in out
    lyco.layers[Q] = lokr(index[Q][2].weight, g, dora="out")
    assert cli.main(["resize", str(source), "--rank", "2", "--out", str(tmp_path / "out.safetensors")]) == 2
    assert "base model (--model)" in capsys.readouterr().err


def test_plain_lora_export_is_resize(model):
    """export --format lora is the toolkit's resize (one rule): the same layers, bit for bit, and its report's kept
    shares are resize's."""
    from trainer.formats.export import plain_lora
    index = model["index"]
    lyco, base = lycoris_adapter(index, seed=18), base_weights(index)
    plain, report = plain_lora(lyco, 3, base)
    resized, expected = resize(lyco, rank=3, base=base)
    for name, layer in resized.layers.items():
        assert torch.equal(plain.layers[name].down, layer.down) and torch.equal(plain.layers[name].up, layer.up)
    worst = min(expected["layers"].items(), key=lambda item: item[1]["kept"])
    assert (report.kept, report.worst, report.worst_layer) == (expected["kept_overall"], worst[1]["kept"], worst[0])
    assert 0 < report.worst < report.kept < 1 and report.layers == len(lyco)
    with pytest.raises(AdapterFormatError, match="base model"):
        plain_lora(lyco, 3)
