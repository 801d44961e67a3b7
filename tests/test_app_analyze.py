"""The Generate tab's analysis: the LoRA paper's section 7 on the adapters in the slots."""
from pathlib import Path

import pytest
import torch
from PIL import Image

from app import generation as G
from app.settings import AppSettings
from app.errors import AppError
from trainer.formats import save_adapter
from trainer.lora_state import Adapter, LoraLayer

NAMES = [f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_{p}" for p in "qkv"]


def adapter(seed: int, rank: int) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    return Adapter({n: LoraLayer(torch.randn(rank, 32, generator=g), torch.randn(32, rank, generator=g), float(rank))
                    for n in NAMES})


def test_two_adapters_give_heatmaps_and_a_summary(tmp_path):
    settings = AppSettings(adapters_dir=tmp_path / "adapters", import_dirs=(tmp_path,))  # its adapters lie there
    a = save_adapter(adapter(0, 4), tmp_path / "r4.safetensors", dtype="fp32")
    b = save_adapter(adapter(1, 8), tmp_path / "r8.safetensors", dtype="fp32")
    images, text = G.analyze_slots(settings, [G.Slot(str(a)), G.Slot(""), G.Slot(str(b))])
    assert len(images) == 2  # the to_q and to_v layers, as the paper looked at Wq and Wv
    assert all(Image.open(p).size[0] > 50 for p, _ in images)
    assert "A: r4" in text and "B: r8" in text and "phi(1, 1)" in text
    assert (Path(images[0][0]).parent / "analysis.json").exists()


def test_one_adapter_gives_its_spectrum_and_no_slot_is_an_error(tmp_path):
    settings = AppSettings(adapters_dir=tmp_path / "adapters", import_dirs=(tmp_path,))  # its adapters lie there
    a = save_adapter(adapter(0, 4), tmp_path / "r4.safetensors", dtype="fp32")
    images, text = G.analyze_slots(settings, [G.Slot(str(a))])
    assert images == [] and "| A: r4 | 3 |" in text
    with pytest.raises(AppError, match="Pick an adapter"):
        G.analyze_slots(settings, [G.Slot("")])
