"""LyCORIS in the app (issue 26, item 7): the Train form shows each network type's fields, writes a config the
engine trains, the two LyCORIS presets validate and train, and the Generate tab exports a LoKr + LoRA blend as a
plain LoRA at a rank (with the kept norm) while a plain blend stays exact."""
import copy

import pytest
import torch

from test_app_generate import LAYERS, write_adapter
from test_training import make_cfg, train
from tiny import make_images
from app import forms as F
from app import generation as G
from app.errors import AppError
from app.settings import AppSettings
from app.tabs import generate as gen_tab
from app.tabs import train as tab
from trainer import config as C

LYCORIS_FIELDS = {"network.conv_rank", "network.conv_alpha", "network.factor", "network.decompose_both",
                  "network.tucker", "network.dora_axis"}
# what each type shows of LYCORIS_FIELDS and dropout (the brief of issue 26: conv for locon, and for loha/lokr
# where they adapt convolutions; factor and decompose_both for lokr; tucker for loha/lokr; dora_axis with DoRA)
EXPECTED = {"lora": {"network.dropout"},
            "locon": {"network.dropout", "network.conv_rank", "network.conv_alpha"},
            "loha": {"network.tucker"},
            "lokr": {"network.tucker", "network.factor", "network.decompose_both"}}


@pytest.fixture
def settings(tmp_path) -> AppSettings:
    return AppSettings(data_dir=tmp_path / "datasets", runs_dir=tmp_path / "runs", adapters_dir=tmp_path / "ad",
                       import_dirs=(tmp_path,))


def form_values(cfg: C.TrainConfig, **changes) -> list:
    values = dict(zip([i.key for i in F.form_fields()], F.config_to_values(cfg)))
    values.update({k.replace("__", "."): v for k, v in changes.items()})
    return [values[i.key] for i in F.form_fields()] + F.encoder_values(cfg)


def shown(settings, cfg, **changes) -> set[str]:
    flags = tab.network_visibility(settings, form_values(cfg, **changes))
    return {key for key, on in zip(F.switched_fields(), flags) if on}


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_picking_each_type_shows_its_fields_and_hides_the_others(settings, kind):
    cfg = C.TrainConfig()
    fields = shown(settings, cfg, network__type=kind) & (LYCORIS_FIELDS | {"network.dropout"})
    assert fields == EXPECTED[kind]
    assert not {"network.rank", "network.alpha"} & set(F.switched_fields())  # every network reads them: always shown
    with_dora = shown(settings, cfg, network__type=kind, network__dora=True)
    assert with_dora & (LYCORIS_FIELDS | {"network.dropout"}) == EXPECTED[kind] | {"network.dora_axis"}
    # LoHa and LoKr adapt the convolutions only where 'conv' is a target: then their rank and alpha show
    convs = shown(settings, cfg, network__type=kind, network__unet_targets="attention\nconv")
    assert {"network.conv_rank", "network.conv_alpha"} <= convs


def test_a_refused_value_stays_in_view_to_be_fixed(settings):
    cfg = C.TrainConfig()
    assert "network.tucker" not in shown(settings, cfg, network__type="lora")
    assert "network.tucker" in shown(settings, cfg, network__type="lora", network__tucker=True)  # refused: shown


def test_the_network_type_is_the_configs_choice():
    import gradio as gr
    assert isinstance(tab.component_for(C.field_info("network.type"), "lokr"), gr.Dropdown)
    assert C.field_info("network.type").choices == ["lora", "locon", "loha", "lokr"]


def test_the_form_writes_back_a_config_the_engine_trains(settings, tiny_model_dir, tmp_path):
    from trainer.formats import load_adapter
    data = make_images(tmp_path / "data", n=4, size=32)
    cfg = make_cfg(tiny_model_dir, data, tmp_path, **{"schedule.max_steps": 2, "network.text_encoders": []})
    cfg.saving.runs_dir = str(settings.runs_dir)
    values = form_values(cfg, network__type="lokr", network__factor=4, network__dora=True, network__dora_axis="in",
                         network__unet_targets="attention\nconv")
    back, errors = tab.to_config(settings, values)
    assert errors == {}, errors
    net = back.network
    assert (net.type, net.factor, net.dora, net.dora_axis, net.unet_targets) == ("lokr", 4, True, "in",
                                                                                 ["attention", "conv"])
    back.dataset.cache_dir = ""  # the app's cache folder is its data folder's; the test keeps none
    path, events, _ = train(back)
    assert type(events[-1]).__name__ == "Finished"
    layers = load_adapter(path).layers.values()
    assert {layer.kind for layer in layers} == {"lokr"} and all(layer.dora_scale is not None for layer in layers)


# ---- presets ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["sdxl-lokr", "sd15-locon-dora"])
def test_the_lycoris_presets_validate_and_their_networks_train_on_the_tiny_model(name, tiny_model_dir, tmp_path):
    from trainer import check_config, load_preset
    from trainer.formats import load_adapter
    preset = load_preset(name)
    assert C.validate(preset, check_paths=False) == []
    net = preset.network
    if name == "sdxl-lokr":
        assert (net.type, net.factor, net.alpha) == ("lokr", 8, net.rank) and not net.dora
    else:
        assert net.type == "locon" and net.rank <= 64 and 1 <= net.alpha <= net.rank / 2
        assert 8 <= net.conv_rank <= 32 and (net.dora, net.dora_axis) == (True, "in")
    data = make_images(tmp_path / "data", n=4, size=32)
    cfg = make_cfg(tiny_model_dir, data, tmp_path, **{"schedule.max_steps": 2})
    cfg.network = copy.deepcopy(net)
    check_config(cfg)
    path, events, _ = train(cfg)
    assert type(events[-1]).__name__ == "Finished"
    adapter = load_adapter(path)
    kinds = {layer.kind for layer in adapter.layers.values()}
    if name == "sdxl-lokr":  # the full W2 ("full dimension") on every module
        assert kinds == {"lokr"} and all(layer.w2 is not None for layer in adapter.layers.values())
    else:
        assert kinds == {"lora"} and all(layer.dora_scale is not None for layer in adapter.layers.values())
        assert any(name.endswith("resnets_0_conv1") for name in adapter.layers), "LoCon adds the convolutions"


# ---- the Generate tab's blend export -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gen_env(tiny_model_dir, tmp_path_factory):
    from trainer.formats import save_adapter
    from trainer.lora_state import Adapter, LokrLayer
    root = tmp_path_factory.mktemp("lyco-gen")
    s = AppSettings(data_dir=root / "datasets", runs_dir=root / "runs", adapters_dir=root / "adapters",
                    base_model=str(tiny_model_dir), import_dirs=(root,))
    g = torch.Generator().manual_seed(5)
    layers = {n: LokrLayer(w1=torch.randn(4, 4, generator=g), w2a=torch.randn(16, 2, generator=g),
                           w2b=torch.randn(2, 16, generator=g), alpha=2.0) for n in LAYERS}
    lokr = save_adapter(Adapter(layers=layers), root / "lokr.safetensors", format="kohya", dtype="fp32")
    return s, lokr, write_adapter(root / "a.safetensors", seed=1), write_adapter(root / "b.safetensors", seed=2)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_a_lokr_and_lora_blend_exports_as_plain_lora_at_the_lycoris_rank(gen_env):
    from trainer.formats import load_adapter
    s, lokr, a, _ = gen_env
    slots = [G.Slot(str(lokr), 1.0), G.Slot(str(a), 0.5)]
    path, kept = G.export_blend_report(s, s.base_model, slots, rank=None, lycoris_rank=G.LYCORIS_BLEND_RANK)
    blend, k, lo = load_adapter(path), load_adapter(lokr), load_adapter(a)
    assert all(layer.kind == "lora" and layer.mid is None and layer.dora_scale is None
               for layer in blend.layers.values()), "a plain LoRA file"
    assert max(layer.rank for layer in blend.layers.values()) <= G.LYCORIS_BLEND_RANK
    for name in LAYERS:  # LoKr rank <= 4 x 2, LoRA 2: rank 32 keeps all of it (fp16 file)
        expected = k.layers[name].delta() + 0.5 * lo.layers[name].delta()
        assert _rel(blend.layers[name].delta(), expected) < 2e-3, name
    assert kept.startswith("Rank 32: kept 100.00% of the blend's norm") and "3 LoKr" in kept, kept
    _, low = G.export_blend_report(s, s.base_model, slots, rank=1)  # the user's rank wins, and says what it kept
    assert low.startswith("Rank 1: kept ") and "100.00%" not in low.split("(")[0], low
    print(kept, "|", low)


def test_a_plain_blend_still_exports_exactly(gen_env):
    from trainer.formats import load_adapter
    s, _, a, b = gen_env
    path, kept = G.export_blend_report(s, s.base_model, [G.Slot(str(a), 0.5), G.Slot(str(b), -1.0)],
                                       rank=None, lycoris_rank=G.LYCORIS_BLEND_RANK)
    assert kept == "" and G.export_blend(s, s.base_model, [G.Slot(str(a), 1.0)]).exists()
    # an empty LyCORIS rank box is no reason to refuse a plain blend; a LyCORIS blend then asks for a rank
    assert gen_tab.lycoris_rank("") is None
    assert G.export_blend_report(s, s.base_model, [G.Slot(str(a), 1.0)], rank=None, lycoris_rank=None)[1] == ""
    with pytest.raises(AppError, match="give the rank for LyCORIS layers"):
        G.export_blend_report(s, s.base_model, [G.Slot(str(gen_env[1]), 1.0)], rank=None, lycoris_rank=None)
    blend, la, lb = load_adapter(path), load_adapter(a), load_adapter(b)
    for name in LAYERS:  # the ranks add up (2 + 2), no SVD
        assert blend.layers[name].rank == 4
        assert _rel(blend.layers[name].delta(), 0.5 * la.layers[name].delta() - lb.layers[name].delta()) < 2e-3


def test_the_lycoris_rank_box_is_checked_and_the_status_carries_the_report(tmp_path):
    with pytest.raises(AppError, match="at least 1"):
        gen_tab.lycoris_rank(0)
    assert gen_tab.lycoris_rank(16.0) == 16
    assert gen_tab.blend_status(tmp_path / "blend-x.safetensors", "Rank 32: kept 99.00%.") == (
        "Wrote **blend-x.safetensors**; it is in the adapter lists now. Rank 32: kept 99.00%.")
