"""SD 3.5 in the app: the model note and one text-encoder row per encoder (T5 frozen unless named), the model
fields in the form, the family's sample defaults on the Train and Generate tabs, the layouts a download offers,
and the sd35 presets. Everything is read from config files: no weights load."""
import dataclasses
from pathlib import Path

import pytest

from app import forms as F
from app.settings import AppSettings
from app.tabs import train as tab
from trainer import config as C

ROOT = Path(__file__).resolve().parents[1]
SD35_PRESETS = ("sd35-medium", "sd35-large")


@pytest.fixture
def settings(tmp_path) -> AppSettings:
    return AppSettings(data_dir=tmp_path / "datasets", runs_dir=tmp_path / "runs", adapters_dir=tmp_path / "ad",
                       import_dirs=(tmp_path,))


def sd3_config(path) -> C.TrainConfig:
    from trainer import default_config
    return default_config(str(path))


def test_the_model_note_and_encoder_rows_show_sd3s_three_encoders_with_t5_frozen(tiny_sd3_dir):
    sd3 = str(tiny_sd3_dir)
    assert F.family_encoders(sd3) == [("te1", "CLIP-L"), ("te2", "CLIP-G"), ("te3", "T5-XXL")]
    note = F.model_note(sd3)
    assert note.startswith("Base model: **Stable Diffusion 3 / 3.5**, native 16 px")  # the tiny VAE: 8 x 2
    assert "CLIP-L (te1) + CLIP-G (te2) + T5-XXL (te3; frozen unless te3 is named" in note
    assert "frozen" not in F.model_note("")  # SD 1.x: its one encoder is in 'all'
    rows = tab.encoder_rows(sd3)  # te, te1, te2, te3: (row visibility, checkbox label) each
    assert [r["visible"] for r in rows[0::2]] == [False, True, True, True]
    assert rows[7]["label"] == "Train T5-XXL (te3)"


def test_all_ticks_both_clips_but_not_t5_and_the_rows_write_back_what_the_engine_trains(tiny_sd3_dir):
    from trainer import named_text_encoders
    cfg = sd3_config(tiny_sd3_dir)
    assert cfg.network.text_encoders == ["all"]
    on = F.encoder_values(cfg)[0::2]  # te, te1, te2, te3
    assert on[1:] == [True, True, False]
    F.apply_encoder_values(cfg, [False, 0, True, 1e-5, True, 1e-5, False, 1e-5])
    assert cfg.network.text_encoders == ["all"]  # exactly what 'all' covers
    F.apply_encoder_values(cfg, [False, 0, True, 1e-5, True, 1e-5, True, 2e-6])
    assert (cfg.network.text_encoders, cfg.optimizer.text_encoder_lrs) == (["te1", "te2", "te3"], ["te3=2e-06"])
    assert F.encoder_values(cfg)[2:] == [True, 1e-5, True, 1e-5, True, 2e-6]
    assert named_text_encoders(cfg.network.text_encoders, str(tiny_sd3_dir)) == ["te1", "te2", "te3"]
    F.apply_encoder_values(cfg, [True, 1e-4, False, 1e-5, False, 1e-5, False, 1e-5])  # the hidden te row ignored
    assert cfg.network.text_encoders == []


def test_the_sd3_model_fields_are_in_the_forms_base_model_section_not_in_view():
    infos = {i.key: i for i in F.form_fields()}
    for key in ("model.clip_l_path", "model.clip_g_path", "model.t5_path", "model.vae_path", "model.t5_length"):
        assert key in infos and not infos[key].basic and infos[key].help.startswith("SD3")
    assert tab.component_for(infos["model.t5_length"], 256).info.endswith("(0 to 512)")


def test_picking_an_sd3_model_brings_its_sample_defaults_unless_the_user_changed_them(tiny_sd3_dir):
    sd3 = str(tiny_sd3_dir)
    tiny = sd3_config("")  # the form as the built-in tiny model fills it
    shown = {i.key: C.get_value(tiny, i.key) for i in F.form_fields()}
    brought = tab.model_defaults(sd3, "", shown)
    assert brought["sampling.steps"] == 28 and brought["sampling.guidance"] == 4.5
    assert brought["dataset.resolution"] == 16 and brought["schedule.max_steps"] == C.TrainConfig().schedule.max_steps
    mine = {**shown, "sampling.steps": 40, "dataset.resolution": 32}  # the user's own values stay
    assert "sampling.steps" not in tab.model_defaults(sd3, "", mine)
    assert "dataset.resolution" not in tab.model_defaults(sd3, "", mine)
    back = tab.model_defaults("", sd3, {**shown, **brought})  # and the tiny model's come back
    assert back["sampling.guidance"] == tiny.sampling.guidance and back["sampling.steps"] == tiny.sampling.steps


def test_the_generate_tab_starts_from_the_sd3_sample_defaults(tiny_sd3_dir, settings):
    from app.main import build_app
    from trainer import generation_defaults
    start = generation_defaults(str(tiny_sd3_dir))
    assert (start["steps"], start["guidance"], start["size"]) == (28, 4.5, 16)
    demo = build_app(dataclasses.replace(settings, base_model=str(tiny_sd3_dir)))
    steps, guidance = (block(demo, "gen-steps"), block(demo, "gen-guidance"))
    assert (steps.value, guidance.value) == (28, 4.5)
    fn = next(f for f in demo.fns.values()
              if any(t == block(demo, "gen-model")._id and ev == "blur" for t, ev in f.targets))
    out = fn.fn(str(tiny_sd3_dir), "")  # the user types the SD3 folder into an empty box
    assert out[2:4] == (28, 4.5) and "Stable Diffusion 3" in out[5]


def block(demo, elem_id: str):
    found = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == elem_id]
    assert len(found) == 1, elem_id
    return found[0]


def test_a_download_offers_each_layout_labelled_by_the_programs_that_read_it(tiny_sd3_dir, settings):
    assert F.format_choices(str(tiny_sd3_dir)) == [("diffusers: diffusers, ComfyUI and A1111", "diffusers"),
                                                   ("kohya: ComfyUI and Forge", "kohya")]
    assert F.format_choices("")[0] == ("kohya: A1111, ComfyUI, Forge and diffusers", "kohya")
    run = Path(settings.runs_dir) / "sd3-run"  # a run folder: its config's base model decides
    run.mkdir(parents=True)
    (run / "config.toml").write_text(C.dumps(sd3_config(tiny_sd3_dir)), encoding="utf-8")
    assert tab.export_formats(settings, "sd3-run") == {"choices": F.format_choices(str(tiny_sd3_dir)),
                                                       "value": "diffusers"}
    assert tab.export_formats(settings, None)["value"] == "kohya"  # no run picked: the app's base model (tiny)


@pytest.mark.parametrize("name", SD35_PRESETS)
def test_the_sd35_presets_validate_and_fit_a_small_card(name):
    from trainer import load_preset
    cfg = load_preset(name)
    assert C.validate(cfg, check_paths=False) == []
    assert (cfg.precision.mixed, cfg.precision.gradient_checkpointing, cfg.dataset.cache_text) == ("bf16", True, True)
    assert cfg.network.text_encoders == [] and cfg.dataset.resolution == 1024
    assert cfg.loss.timestep_sampling == "logit_normal" and cfg.optimizer.unet_lr <= 1e-4
    assert cfg.model.t5_path == "" and cfg.model.t5_length == 0  # T5-XXL (9.5 GB) left out: see the comments


def test_the_sd35_large_preset_clips_gradients_as_its_instability_asks():
    from trainer import load_preset
    cfg = load_preset("sd35-large")
    assert 0.1 <= cfg.optimizer.max_grad_norm <= 1.0


def test_an_sd35_preset_on_an_sd3_model_keeps_the_familys_sample_defaults(tiny_sd3_dir):
    from trainer import apply_preset
    cfg, _ = apply_preset(sd3_config(tiny_sd3_dir), "sd35-medium")
    assert cfg.model.path == str(tiny_sd3_dir)  # the user's own model stays
    assert (cfg.sampling.steps, cfg.sampling.guidance) == (28, 4.5) and cfg.network.rank == 16
