"""The adapter layer types (trainer/lora_state.py) compute the update LyCORIS computes from the same tensors
(lycoris-lora 4.1, its functional API: the reference implementation whose files A1111, ComfyUI and Forge read)."""
from __future__ import annotations

import pytest
import torch

from trainer.lora_state import LohaLayer, LokrLayer, LoraLayer, dora_axis

lycoris = pytest.importorskip("lycoris.functional")


def rand(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def close(a, b):
    return torch.allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def test_locon_linear_conv_and_tucker():
    from lycoris.functional import locon
    for down, up, mid in ((rand(4, 6), rand(5, 4), None), (rand(4, 6, 3, 3), rand(5, 4, 1, 1), None),
                          (rand(4, 6, 1, 1), rand(5, 4, 1, 1), rand(4, 4, 3, 3))):
        layer = LoraLayer(down, up, alpha=2.0, mid=mid)
        expected = locon.diff_weight(down, up, mid, gamma=0.5, backend="torch")
        assert close(layer.delta(torch.float64), expected)


def test_loha_linear_conv_and_tucker():
    from lycoris.functional import loha
    cases = ((rand(5, 3), rand(3, 6), rand(5, 3), rand(3, 6), None, None),
             (rand(5, 3), rand(3, 54), rand(5, 3), rand(3, 54), None, None),  # a 3x3 conv, stored flattened
             (rand(3, 5), rand(3, 6), rand(3, 5), rand(3, 6), rand(3, 3, 3, 3), rand(3, 3, 3, 3)))
    for w1a, w1b, w2a, w2b, t1, t2 in cases:
        conv = w1b.shape[1] == 54
        layer = LohaLayer(w1a, w1b, w2a, w2b, alpha=1.5, t1=t1, t2=t2, shape=(5, 6, 3, 3) if conv else None)
        if conv:  # its functional API takes the unflattened [r, in, k, k]
            w1b, w2b = w1b.reshape(3, 6, 3, 3), w2b.reshape(3, 6, 3, 3)
        expected = loha.diff_weight(w1b, w1a, w2b, w2a, t1, t2, gamma=0.5, backend="torch")
        assert close(layer.delta(torch.float64), expected)


def test_lokr_full_low_rank_conv_and_tucker():
    from lycoris.functional import lokr
    cases = [dict(w1=rand(2, 3), w2=rand(4, 5)),
             dict(w1=rand(2, 3), w2a=rand(4, 2), w2b=rand(2, 5)),
             dict(w1a=rand(2, 2), w1b=rand(2, 3), w2=rand(4, 5)),
             dict(w1=rand(2, 3), w2a=rand(4, 2), w2b=rand(2, 5 * 9)),
             dict(w1=rand(2, 3), w2a=rand(2, 2), w2b=rand(2, 5), t2=rand(2, 2, 3, 3))]  # (r = out2: see rank)
    for kw in cases:
        conv = kw.get("w2b") is not None and kw["w2b"].shape[1] == 45  # stored flattened, as LyCORIS keeps it
        layer = LokrLayer(**kw, alpha=1.0, shape=(8, 15, 3, 3) if conv else None)
        w2b = kw["w2b"].reshape(2, 5, 3, 3) if conv else kw.get("w2b")  # its functional API takes it unflattened
        weights = (kw.get("w1"), kw.get("w1a"), kw.get("w1b"), kw.get("w2"), kw.get("w2a"), w2b, kw.get("t2"))
        expected = lokr.diff_weight(*weights, gamma=layer.alpha, backend="torch")  # its gamma: alpha
        got = layer.delta(torch.float64)
        assert got.shape == expected.shape and close(got, expected), kw.keys()
    assert LokrLayer(w1=rand(2, 3), w2=rand(4, 5), alpha=7.0).scale == 1.0  # both full: LyCORIS's scale 1


@pytest.mark.parametrize("axis", ["out", "in"])
def test_dora_applies_the_magnitude_along_its_axis_as_lycoris(axis):
    from lycoris.functional.general import weight_decompose
    w0, down, up = rand(5, 6), rand(2, 6), rand(5, 2)
    merged = w0 + up @ down
    norm = merged.norm(dim=1, keepdim=True) if axis == "out" else merged.norm(dim=0, keepdim=True)
    m = norm * (1 + 0.1 * rand(*norm.shape))
    layer = LoraLayer(down, up, alpha=2.0, dora_scale=m)
    assert dora_axis(m) == axis
    expected = weight_decompose(merged, m, 1, wd_on_out=axis == "out", backend="torch")
    assert torch.allclose(layer.applied(w0).double(), expected, rtol=1e-5)
    assert torch.allclose(layer.applied(w0, strength=0.0), w0.float())
