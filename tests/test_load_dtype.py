"""Loading in the training precision: load_base_model(dtype=bf16, vae_dtype=fp32) reads the denoiser and the text
encoders in bf16 (a FLUX.1 transformer never exists in fp32 on the way: 24 GB less CPU memory than reading fp32 and
casting) and the VAE in fp32, from folders and single files of every family; the values are the fp32 ones cast."""
from __future__ import annotations

import pytest
import torch

from trainer.models import load_base_model


def _dtypes(module) -> set[torch.dtype]:
    return {p.dtype for p in module.parameters() if p.is_floating_point()}


@pytest.fixture(scope="module")
def klein_dir(tmp_path_factory):
    from tiny_flux2 import make_tiny_klein
    return make_tiny_klein(tmp_path_factory.mktemp("tiny-klein") / "model")


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_sdxl_dir", "tiny_sd3_dir", "tiny_flux_dir", "klein_dir"])
def test_folders_load_the_denoiser_and_text_encoders_in_bf16_and_the_vae_in_fp32(fixture, request):
    path = str(request.getfixturevalue(fixture))
    half = load_base_model(path, dtype="bf16", vae_dtype="fp32")
    full = load_base_model(path)
    assert _dtypes(half.denoiser) == {torch.bfloat16} and _dtypes(half.vae) == {torch.float32}
    for prefix, encoder in half.text_encoders.items():
        assert encoder.dtype == torch.bfloat16, prefix  # (T5 keeps its `wo` in fp32: transformers' own rule)
    a, b = half.denoiser.state_dict(), full.denoiser.state_dict()
    assert all(torch.equal(a[k], b[k].to(a[k].dtype)) for k in a)
    a, b = half.vae.state_dict(), full.vae.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _dtypes(load_base_model(path, dtype="bf16").vae) == {torch.bfloat16}  # vae_dtype defaults to dtype


def test_single_files_load_the_vae_in_its_own_dtype(tiny_model_dir, tiny_flux_dir, tmp_path):
    from safetensors.torch import save_file
    from test_models import copy_configs, to_original_layout
    from tiny_flux import write_bfl_files
    sd1 = load_base_model(str(tiny_model_dir))
    save_file(to_original_layout(sd1.denoiser, sd1.vae, sd1.text_encoder), str(tmp_path / "sd1.safetensors"))
    copy_configs(tiny_model_dir, tmp_path / "sd1.config")
    options = write_bfl_files(load_base_model(str(tiny_flux_dir)), tmp_path)
    for base in (load_base_model(str(tmp_path / "sd1.safetensors"), dtype="bf16", vae_dtype="fp32"),
                 load_base_model(str(tmp_path / "transformer.safetensors"), config_dir=tiny_flux_dir,
                                 options=options, dtype="bf16", vae_dtype="fp32")):
        assert _dtypes(base.denoiser) == {torch.bfloat16} and _dtypes(base.vae) == {torch.float32}, base.family.name
        assert all(e.dtype == torch.bfloat16 for e in base.text_encoders.values())


def test_a_run_loads_in_its_frozen_dtype_with_the_vae_in_fp32(tiny_model_dir, image_dir, tmp_path, monkeypatch):
    """The loop asks for what it trains in (on a GPU the half precision of precision.mixed; forced here on the CPU)."""
    import trainer.loop as loop
    import trainer.models as models
    from test_training import make_cfg, train
    loaded = []
    real = models.load_base_model
    monkeypatch.setattr(models, "load_base_model", lambda *a, **kw: loaded.append((kw, real(*a, **kw))) or
                        loaded[-1][1])
    monkeypatch.setattr(loop, "_frozen_dtype", lambda cfg, device: torch.bfloat16)
    path, _, _ = train(make_cfg(tiny_model_dir, image_dir, tmp_path, **{"precision.mixed": "bf16",
                                                                         "schedule.max_steps": 2}))
    (kwargs, base), = loaded
    assert (kwargs["dtype"], kwargs["vae_dtype"]) == (torch.bfloat16, torch.float32) and path.is_file()
    assert {p.dtype for p in base.denoiser.parameters() if not p.requires_grad} == {torch.bfloat16}  # not LoRA's
