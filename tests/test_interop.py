"""Issue 2 acceptance: a file we export loads into a stock diffusers pipeline with every key used, and the
pipeline then computes what our LoRA-injected model computes (kohya and diffusers layouts, fp32)."""
from __future__ import annotations

import logging
import re
import warnings
from contextlib import contextmanager

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from safetensors import safe_open

from tiny import tiny_components
from trainer.formats import adapter_from_model, kohya_name, module_index, save_adapter
from trainer.lora_state import Adapter, LoraLayer

UNET_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
TE_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]
# what diffusers/transformers/peft say when keys of a LoRA file go unused or unmatched
LOAD_COMPLAINTS = re.compile(r"unexpected|missing|not correctly renamed|No LoRA keys|not loaded|not found|did not match"
                             r"|ignored",
                             re.IGNORECASE)


def stock_pipeline():
    from diffusers import StableDiffusionPipeline
    return StableDiffusionPipeline(**tiny_components(seed=0), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


@pytest.fixture(scope="module")
def trained():
    """Tiny components with peft LoRA (rank 4, alpha 8) in UNet and text-encoder attention, B set non-zero."""
    parts = tiny_components(seed=0)
    config = dict(r=4, lora_alpha=8, init_lora_weights="gaussian")
    parts["unet"].add_adapter(LoraConfig(target_modules=UNET_ATTENTION, **config))
    inject_adapter_in_model(LoraConfig(target_modules=TE_ATTENTION, **config), parts["text_encoder"])
    generator = torch.Generator().manual_seed(1)
    for model in (parts["unet"], parts["text_encoder"]):
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data = torch.randn(param.shape, generator=generator) * 0.1
    return parts


def model_inputs(tokenizer):
    generator = torch.Generator().manual_seed(2)
    ids = tokenizer(["a red square on blue"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    return {"sample": torch.randn(1, 4, 8, 8, generator=generator), "timestep": torch.tensor([10]),
            "encoder_hidden_states": torch.randn(1, 77, 32, generator=generator), "input_ids": ids}


@torch.no_grad()
def outputs(unet, text_encoder, inputs):
    unet_out = unet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"]).sample
    return unet_out, text_encoder(inputs["input_ids"]).last_hidden_state


@contextmanager
def load_complaints():
    """Collect every warning and WARNING log line of diffusers, transformers and peft while loading."""
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler, loggers = Collect(level=logging.WARNING), [logging.getLogger(n) for n in ("diffusers", "transformers",
                                                                                         "peft")]
    for logger in loggers:
        logger.addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield records
    for logger in loggers:
        logger.removeHandler(handler)
    records += [str(w.message) for w in caught]


def load_into_stock_pipeline(path):
    pipe = stock_pipeline()
    with load_complaints() as complaints:
        pipe.load_lora_weights(str(path))
    relevant = [c for c in complaints if LOAD_COMPLAINTS.search(c)]
    assert not relevant, relevant
    return pipe


def lora_module_count(model) -> int:
    return sum(1 for _, m in model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A) > 0)


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_stock_diffusers_loads_our_file_and_matches_the_injected_model(trained, tmp_path, layout):
    adapter = adapter_from_model(trained["unet"], {"lora_te": trained["text_encoder"]})
    # 6 transformer blocks (2 down, 1 mid, 3 up) x attn1/attn2 x q/k/v/out; 2 CLIP layers x q/k/v/out
    assert len(adapter) == 6 * 2 * 4 + 2 * 4 and all(layer.alpha == 8.0 for layer in adapter.layers.values())
    path = save_adapter(adapter, tmp_path / f"tiny-{layout}.safetensors", format=layout, dtype="fp32")

    pipe = load_into_stock_pipeline(path)
    assert lora_module_count(pipe.unet) == 48 and lora_module_count(pipe.text_encoder) == 8

    inputs = model_inputs(trained["tokenizer"])
    expected_unet, expected_te = outputs(trained["unet"], trained["text_encoder"], inputs)
    base_unet, base_te = outputs(*_base_models(), inputs)
    got_unet, got_te = outputs(pipe.unet, pipe.text_encoder, inputs)
    # the adapter must change both models, or matching them would prove nothing
    assert (expected_unet - base_unet).abs().max() > 1e-3 and (expected_te - base_te).abs().max() > 1e-3
    torch.testing.assert_close(got_unet, expected_unet, atol=1e-4, rtol=0)
    torch.testing.assert_close(got_te, expected_te, atol=1e-4, rtol=0)


def _base_models():
    parts = tiny_components(seed=0)
    return parts["unet"], parts["text_encoder"]


def test_kohya_text_encoder_names_are_the_literal_text_model_form(trained, tmp_path):
    adapter = adapter_from_model(trained["unet"], {"lora_te": trained["text_encoder"]})
    path = save_adapter(adapter, tmp_path / "tiny.safetensors", dtype="fp32")
    with safe_open(str(path), framework="pt") as f:
        te_keys = [k for k in f.keys() if k.startswith("lora_te")]
    names = {k.split(".")[0] for k in te_keys}
    expected = {f"lora_te_text_model_encoder_layers_{i}_self_attn_{p}" for i in range(2) for p in TE_ATTENTION}
    assert names == expected
    assert len(te_keys) == 3 * len(expected)


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_mixed_ranks_and_alphas_reach_diffusers_intact(tmp_path, layout):
    """Per-layer ranks and alphas (rank_pattern / alpha_pattern in the diffusers layout) and 3x3 conv (LoCon)
    layers, against the deltas merged into the base weights by hand."""
    base = tiny_components(seed=0)
    index = module_index(base["unet"], {"lora_te": base["text_encoder"]})
    generator = torch.Generator().manual_seed(3)
    targets = [n for n, (_, path, _) in index.items() if path.endswith(tuple(UNET_ATTENTION + TE_ATTENTION))
               or path.endswith("resnets.0.conv1")]
    assert sum(name.endswith("conv1") for name in targets) == 5
    layers = {}
    for i, name in enumerate(targets):
        out_features, in_features, *kernel = index[name][2].weight.shape
        rank, alpha = (2, 1.0) if i % 3 == 0 else (4, 8.0) if i % 3 == 1 else (4, None)
        layers[name] = LoraLayer(down=torch.randn(rank, in_features, *kernel, generator=generator) * 0.3,
                                 up=torch.randn(out_features, rank, *[1] * len(kernel), generator=generator) * 0.3,
                                 alpha=alpha)
    adapter = Adapter(layers=layers)
    path = save_adapter(adapter, tmp_path / f"mixed-{layout}.safetensors", format=layout, dtype="fp32")
    pipe = load_into_stock_pipeline(path)

    with torch.no_grad():  # reference: the deltas merged into the base weights by hand
        for name, layer in layers.items():
            index[name][2].weight += layer.delta()
    inputs = model_inputs(base["tokenizer"])
    expected_unet, expected_te = outputs(base["unet"], base["text_encoder"], inputs)
    got_unet, got_te = outputs(pipe.unet, pipe.text_encoder, inputs)
    torch.testing.assert_close(got_unet, expected_unet, atol=1e-4, rtol=0)
    torch.testing.assert_close(got_te, expected_te, atol=1e-4, rtol=0)


def test_kohya_name_of_a_flattened_clip_path():
    assert kohya_name("lora_te", "encoder.layers.1.mlp.fc2") == "lora_te_text_model_encoder_layers_1_mlp_fc2"
