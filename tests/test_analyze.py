"""Spectra, effective ranks and the paper's normalised subspace similarity (Hu et al. 2021, section 7)."""
from __future__ import annotations

import json

import pytest
import torch

from trainer.adapters.analyze import analyze, effective_rank, energy_rank, spectrum, subspace_similarity
from trainer.lora_state import Adapter, LoraLayer


def _adapter(seed: int, rank: int = 8, fan_in: int = 64, out: int = 48, conv: bool = False) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    down = torch.randn(rank, fan_in, generator=g)
    up = torch.randn(out, rank, generator=g)
    layers = {"lora_unet_x_attn1_to_q": LoraLayer(down, up, 4.0)}
    if conv:  # a 3x3 conv layer: A is flattened to [r, in*3*3]
        layers["lora_unet_x_conv1"] = LoraLayer(torch.randn(rank, 8, 3, 3, generator=g),
                                                torch.randn(out, rank, 1, 1, generator=g), 4.0)
    return Adapter(layers)


def test_energy_and_entropy_ranks():
    assert effective_rank(torch.ones(4)) == pytest.approx(4.0)
    assert effective_rank(torch.tensor([2.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert 1.0 < effective_rank(torch.tensor([3.0, 1.0])) < 2.0
    assert energy_rank(torch.tensor([3.0, 1.0]), 0.90) == 1  # 9 / 10 of the energy
    assert energy_rank(torch.tensor([3.0, 1.0]), 0.99) == 2
    assert energy_rank(torch.zeros(3), 0.9) == 0


def test_spectrum_matches_the_dense_delta():
    adapter = _adapter(0, conv=True)
    for name, info in spectrum(adapter).items():
        dense = torch.linalg.svdvals(adapter.layers[name].delta().flatten(1).double())[:8]
        assert torch.allclose(torch.tensor(info["singular_values"], dtype=torch.float64), dense, rtol=1e-6)
        assert 1 <= info["rank_90"] <= info["rank_99"] <= 8
        assert info["effective_rank"] <= 8


def test_similarity_with_itself_is_one_on_the_diagonal():
    down = _adapter(1, conv=True).layers["lora_unet_x_conv1"].down
    phi = subspace_similarity(down, down)
    assert phi.shape == (8, 8)
    assert torch.allclose(phi.diagonal(), torch.ones(8, dtype=torch.float64), atol=1e-9)
    # the same subspace under another basis (what retraining often gives) is still 1
    mixed = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(2)))[0].float() @ down.flatten(1)
    assert subspace_similarity(down.flatten(1), mixed)[-1, -1] == pytest.approx(1.0, abs=1e-6)


def test_independent_random_subspaces_average_max_i_j_over_d():
    """E ||U_i^T U_j||_F^2 = i j / d for independent random subspaces of R^d, so E phi(i, j) = max(i, j) / d."""
    d, r1, r2, seeds = 128, 8, 16, 20
    phis = torch.stack([subspace_similarity(_adapter(2 * s, r1, d).layers["lora_unet_x_attn1_to_q"].down,
                                            _adapter(2 * s + 1, r2, d).layers["lora_unet_x_attn1_to_q"].down)
                        for s in range(seeds)]).mean(0)
    i = torch.arange(1, r1 + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, r2 + 1, dtype=torch.float64)[None, :]
    expected = torch.maximum(i, j) / d
    assert (phis / expected).mean() == pytest.approx(1.0, abs=0.1)
    assert phis[-1, -1] == pytest.approx(float(expected[-1, -1]), rel=0.1)
    assert phis.max() < 0.3  # far from the 1.0 of a shared subspace


def test_analyze_writes_json_and_heatmaps(tmp_path):
    from PIL import Image
    a, b = _adapter(3, rank=8, conv=True), _adapter(4, rank=4, conv=True)
    result = analyze(a, tmp_path, b, labels=("r8", "r4"))
    data = json.loads((tmp_path / "analysis.json").read_text())
    assert data == json.loads(json.dumps(result))
    assert set(data["adapters"]) == {"r8", "r4"}
    heatmaps = data["similarity"]["heatmaps"]
    assert list(heatmaps) == ["lora_unet_x_attn1_to_q"]  # the default picks q/v layers, as the paper did
    entry = heatmaps["lora_unet_x_attn1_to_q"]
    assert len(entry["phi"]) == 8 and len(entry["phi"][0]) == 4
    image = Image.open(tmp_path / entry["png"])
    assert image.mode == "RGB" and image.size[0] > 4 * 3 and image.size[1] > 8 * 3
    import numpy as np
    colours = {tuple(c) for c in np.asarray(image).reshape(-1, 3)}
    assert (253, 231, 37) in colours and (68, 1, 84) in colours  # the colour bar's two ends
    both = analyze(a, tmp_path / "conv", b, layers=["lora_unet_x_conv1"])
    assert list(both["similarity"]["heatmaps"]) == ["lora_unet_x_conv1"]
    with pytest.raises(ValueError, match="not in both adapters"):
        analyze(a, tmp_path, b, layers=["lora_unet_missing"])


def test_cli_analyze(tmp_path, capsys):
    from trainer.formats import save_adapter
    from trainer.adapters.cli import main
    for seed in (5, 6):
        save_adapter(_adapter(seed), tmp_path / f"a{seed}.safetensors", dtype="fp32")
    assert main(["analyze", str(tmp_path / "a5.safetensors"), str(tmp_path / "a6.safetensors"),
                 "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "analysis.json").is_file()
    assert "heatmap:" in capsys.readouterr().out
    assert main(["analyze", str(tmp_path / "a5.safetensors"), "--out", str(tmp_path / "one")]) == 0
    assert main(["analyze", *(str(tmp_path / "a5.safetensors"),) * 3, "--out", str(tmp_path / "x")]) == 2
    assert "one or two adapter files" in capsys.readouterr().err


def test_adapters_for_different_models_are_named_in_the_error(tmp_path, capsys):
    from trainer.formats import AdapterFormatError, save_adapter
    from trainer.adapters.cli import main
    save_adapter(_adapter(1, fan_in=64), tmp_path / "sd15.safetensors", dtype="fp32")
    save_adapter(_adapter(2, fan_in=320), tmp_path / "sdxl.safetensors", dtype="fp32")
    assert main(["analyze", str(tmp_path / "sd15.safetensors"), str(tmp_path / "sdxl.safetensors"),
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "sd15.safetensors" in err and "sdxl.safetensors" in err and "lora_unet_x_attn1_to_q" in err
    with pytest.raises(AdapterFormatError, match="share no layers"):
        analyze(_adapter(1), tmp_path, Adapter({"lora_unet_y": _adapter(2).layers["lora_unet_x_attn1_to_q"]}))
