"""FLUX.1 in the app: the model note and one text-encoder row per encoder (CLIP-L and T5, T5 frozen unless named),
the family's sample defaults on the Train and Generate tabs (dev: FluxPipeline's 28 steps at guidance 3.5; schnell:
4 steps at 0), the layouts a download offers, and the flux-dev presets. Everything is read from config files: no
weights load."""
import dataclasses
from pathlib import Path

import pytest

from app import forms as F
from app.settings import AppSettings
from app.tabs import train as tab
from trainer import config as C

ROOT = Path(__file__).resolve().parents[1]
FLUX_PRESETS = ("flux-dev-24gb", "flux-dev-16gb", "flux-dev-12gb")
SHIPPED = ROOT / "trainer" / "models" / "configs"


@pytest.fixture
def settings(tmp_path) -> AppSettings:
    return AppSettings(data_dir=tmp_path / "datasets", runs_dir=tmp_path / "runs", adapters_dir=tmp_path / "ad",
                       import_dirs=(tmp_path,))


@pytest.fixture(scope="module")
def tiny_schnell_dir(tmp_path_factory) -> Path:
    from tiny_flux import make_tiny_flux
    return make_tiny_flux(tmp_path_factory.mktemp("tiny-schnell") / "model", guidance=False)


def flux_config(path) -> C.TrainConfig:
    from trainer import default_config
    return default_config(str(path))


def test_the_model_note_and_encoder_rows_show_clip_l_and_a_frozen_t5(tiny_flux_dir):
    flux = str(tiny_flux_dir)
    assert F.family_encoders(flux) == [("te1", "CLIP-L"), ("te3", "T5-XXL")]
    note = F.model_note(flux)
    # the tiny VAE halves once: FluxPipeline's default_sample_size 128 x 2 (diffusers pipeline_flux.py l. 208-215)
    assert note.startswith("Base model: **FLUX.1**, native 256 px")
    assert note.endswith("CLIP-L (te1) + T5-XXL (te3; frozen unless te3 is named: 'all' leaves it out).")
    rows = tab.encoder_rows(flux)  # te, te1, te2, te3: (row visibility, checkbox label) each
    assert [r["visible"] for r in rows[0::2]] == [False, True, False, True]  # no CLIP-G row
    assert (rows[3]["label"], rows[7]["label"]) == ("Train CLIP-L (te1)", "Train T5-XXL (te3)")


def test_the_real_flux_configs_are_native_1024_px():
    for variant in ("flux1-dev", "flux1-schnell"):
        summary = F.model_summary(str(SHIPPED / variant))
        assert (summary["label"], summary["native"]) == ("FLUX.1", 1024), variant


def test_all_ticks_clip_l_but_not_t5_and_the_rows_write_back_what_the_engine_trains(tiny_flux_dir):
    from trainer import named_text_encoders
    cfg = flux_config(tiny_flux_dir)
    assert cfg.network.text_encoders == ["all"]
    assert F.encoder_values(cfg)[2::2] == [True, True, False]  # te1, te2 (hidden), te3
    F.apply_encoder_values(cfg, [False, 0, True, 1e-5, True, 1e-5, False, 1e-5])  # the hidden te2 row ignored
    assert cfg.network.text_encoders == ["all"]
    F.apply_encoder_values(cfg, [False, 0, True, 1e-5, False, 1e-5, True, 2e-6])
    assert (cfg.network.text_encoders, cfg.optimizer.text_encoder_lrs) == (["te1", "te3"], ["te3=2e-06"])
    assert named_text_encoders(cfg.network.text_encoders, str(tiny_flux_dir)) == ["te1", "te3"]
    F.apply_encoder_values(cfg, [True, 1e-4, False, 1e-5, False, 1e-5, False, 1e-5])
    assert cfg.network.text_encoders == []


def test_the_flux_model_fields_are_in_the_forms_base_model_section():
    infos = {i.key: i for i in F.form_fields()}
    for key in ("model.train_guidance", "model.t5_length", "loss.resolution_shift", "loss.flow_shift",
                "precision.fp8_base"):
        assert key in infos and not infos[key].basic, key
    assert infos["model.train_guidance"].help.startswith("FLUX.1 dev only")
    assert tab.component_for(infos["model.train_guidance"], 1.0).info.endswith("(0 to 30)")


def test_picking_a_flux_model_brings_its_sample_defaults_unless_the_user_changed_them(tiny_flux_dir):
    flux = str(tiny_flux_dir)
    tiny = flux_config("")
    shown = {i.key: C.get_value(tiny, i.key) for i in F.form_fields()}
    brought = tab.model_defaults(flux, "", shown)
    assert (brought["sampling.steps"], brought["sampling.guidance"], brought["dataset.resolution"]) == (28, 3.5, 256)
    mine = {**shown, "sampling.guidance": 2.5}  # the user's own value stays
    assert "sampling.guidance" not in tab.model_defaults(flux, "", mine)
    back = tab.model_defaults("", flux, {**shown, **brought})  # and the tiny model's come back
    assert back["sampling.guidance"] == tiny.sampling.guidance and back["sampling.steps"] == tiny.sampling.steps


def test_the_generate_tab_starts_from_flux_devs_sample_defaults(tiny_flux_dir, settings):
    from app.main import build_app
    from trainer import generation_defaults
    start = generation_defaults(str(tiny_flux_dir))
    assert (start["steps"], start["guidance"], start["size"]) == (28, 3.5, 256)
    demo = build_app(dataclasses.replace(settings, base_model=str(tiny_flux_dir)))
    assert (block(demo, "gen-steps").value, block(demo, "gen-guidance").value) == (28, 3.5)
    assert "FLUX.1" in block(demo, "gen-model").info and "FLUX.1" in block(demo, "gen-negative").info
    fn = next(f for f in demo.fns.values()
              if any(t == block(demo, "gen-model")._id and ev == "blur" for t, ev in f.targets))
    out = fn.fn(str(tiny_flux_dir), "")  # the user types the FLUX folder into an empty box
    assert out[2:4] == (28, 3.5) and "FLUX.1" in out[5]


def test_a_schnell_model_starts_from_4_steps_at_guidance_0(tiny_schnell_dir):
    from trainer import generation_defaults
    start = generation_defaults(str(tiny_schnell_dir))
    assert (start["steps"], start["guidance"]) == (4, 0.0)


def block(demo, elem_id: str):
    found = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == elem_id]
    assert len(found) == 1, elem_id
    return found[0]


def test_a_download_offers_kohya_first_as_comfyui_forge_and_diffusers_read_it(tiny_flux_dir, settings):
    assert F.format_choices(str(tiny_flux_dir)) == [("kohya: ComfyUI, Forge and diffusers", "kohya"),
                                                    ("diffusers: diffusers and ComfyUI", "diffusers")]
    run = Path(settings.runs_dir) / "flux-run"  # a run folder: its config's base model decides
    run.mkdir(parents=True)
    (run / "config.toml").write_text(C.dumps(flux_config(tiny_flux_dir)), encoding="utf-8")
    assert tab.export_formats(settings, "flux-run") == {"choices": F.format_choices(str(tiny_flux_dir)),
                                                        "value": "kohya"}


@pytest.mark.parametrize("name", FLUX_PRESETS)
def test_the_flux_dev_presets_validate_and_train_as_sd_scripts_recommends(name):
    from trainer import load_preset
    cfg = load_preset(name)
    assert C.validate(cfg, check_paths=False) == []
    assert (cfg.precision.mixed, cfg.precision.gradient_checkpointing, cfg.precision.fp8_base) == ("bf16", True, True)
    assert cfg.dataset.cache_text and cfg.network.text_encoders == [] and cfg.dataset.resolution % 16 == 0
    assert (cfg.model.train_guidance, cfg.model.t5_length) == (1.0, 512)  # sd-scripts: guidance 1.0, dev's 512
    # sd-scripts' `shift` sampling with discrete_flow_shift 3.1582: sigmoid(N(0, 1)), then shifted
    assert (cfg.loss.timestep_sampling, cfg.loss.logit_mean, cfg.loss.logit_std) == ("logit_normal", 0.0, 1.0)
    assert cfg.loss.flow_shift == 3.1582 and not cfg.loss.resolution_shift
    assert (cfg.sampling.steps, cfg.sampling.guidance) == (28, 3.5)
    assert cfg.model.vae_path.endswith("ae.safetensors") and cfg.model.t5_path and cfg.model.clip_l_path


def test_the_smaller_cards_presets_train_less_and_offload_blocks_as_sd_scripts_swaps():
    from trainer import load_preset
    cfgs = [load_preset(name) for name in FLUX_PRESETS]
    assert [c.dataset.batch_size for c in cfgs] == [2, 1, 1]  # sd-scripts' table: 24 GB batch 2, 16 GB batch 1
    assert cfgs[2].optimizer.name == "adamw8bit"  # 12 GB: 8-bit AdamW
    assert [c.network.rank for c in cfgs] == sorted((c.network.rank for c in cfgs), reverse=True)
    assert [c.precision.offload_blocks for c in cfgs] == [0, 39, 35]  # sd-scripts' swap 18 and 16, in bytes
    assert all(c.precision.gradient_checkpointing for c in cfgs)  # which offloading needs
    for name in FLUX_PRESETS[1:]:
        text = (ROOT / "presets" / f"{name}.toml").read_text(encoding="utf-8")
        assert "NOT measured on a GPU" in text and "blocks_to_swap" in text


def test_a_flux_preset_on_a_flux_model_keeps_the_users_model_and_devs_sample_defaults(tiny_flux_dir):
    from trainer import apply_preset
    cfg, _ = apply_preset(flux_config(tiny_flux_dir), "flux-dev-16gb")
    assert cfg.model.path == str(tiny_flux_dir)
    assert (cfg.sampling.steps, cfg.sampling.guidance, cfg.network.rank) == (28, 3.5, 16)


def test_a_cli_config_without_sampling_values_samples_flux_as_its_family_does(tiny_flux_dir, tiny_model_dir, tmp_path):
    """`train --set model.path=FLUX` (no preset) and a sparse TOML: FLUX.1 dev's 28 steps at guidance 3.5, not the
    config's SD defaults; what the user says wins; SD 1.x keeps the config's defaults."""
    from trainer.__main__ import resolve_config
    default = C.TrainConfig().sampling
    cfg = resolve_config(None, [f"model.path={tiny_flux_dir}"])
    assert (cfg.sampling.steps, cfg.sampling.guidance) == (28, 3.5)
    cfg = resolve_config(None, [f"model.path={tiny_flux_dir}", "sampling.steps=9"])
    assert (cfg.sampling.steps, cfg.sampling.guidance) == (9, 3.5)
    toml = tmp_path / "mine.toml"
    toml.write_text(f'[model]\npath = "{tiny_flux_dir}"\n[sampling]\nguidance = 2.0\n', encoding="utf-8")
    cfg = resolve_config(str(toml), [])
    assert (cfg.sampling.steps, cfg.sampling.guidance) == (28, 2.0)
    cfg = resolve_config(None, [f"model.path={tiny_model_dir}"])
    assert (cfg.sampling.steps, cfg.sampling.guidance) == (default.steps, default.guidance)
