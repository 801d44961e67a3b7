"""Issue 17: a held-out, deterministic validation loss, the best checkpoint, and export --step best."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from test_training import make_cfg, train
from tiny import make_images
from trainer import config as C
from trainer import runs
from trainer.__main__ import main
from trainer.data import BatchPlan, scan_dataset
from trainer.events import Progress, Validation, read_events
from trainer.models.noise import fixed_timesteps
from trainer.validation import split_validation

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def eight_images(tmp_path):
    return make_images(tmp_path / "eight", n=8)


def val_cfg(tiny_model_dir, data_dir, tmp_path, **overrides):
    values = {"validation.split": 0.25, "validation.every_n_steps": 2, "saving.every_n_steps": 4,
              "schedule.max_steps": 8, "saving.keep_last": 1, "optimizer.unet_lr": 3e-3, "network.dropout": 0.1}
    values.update(overrides)
    return make_cfg(tiny_model_dir, data_dir, tmp_path, **values)


def validations(run_dir: Path) -> list[Validation]:
    return [e for e in read_events(run_dir / "events.jsonl") if isinstance(e, Validation)]


def test_the_timesteps_are_evenly_spaced():
    assert fixed_timesteps(1000, 4) == [200, 400, 600, 800]


def test_held_out_images_never_appear_in_a_training_batch(tiny_model_dir, eight_images, tmp_path):
    for repeats_folder in (False, True):
        data = eight_images
        if repeats_folder:
            data = tmp_path / "with-repeats"
            make_images(data / "3_subject", n=8)
        cfg = val_cfg(tiny_model_dir, data, tmp_path)
        scan = scan_dataset(cfg.dataset)
        train_scan, held = split_validation(scan, cfg)
        assert len(held) == 2 and len(train_scan.items) == 6
        plan = BatchPlan(train_scan, cfg.dataset, cfg.run.seed)
        trained = {train_scan.items[i].path for epoch in range(3) for batch in plan.epoch(epoch) for i in batch}
        assert trained == {item.path for item in train_scan.items}
        assert not trained & {item.path for item in held}
        assert split_validation(scan, cfg)[1] == held, "drawn by the seed: the same images every time"


def test_the_validation_loss_is_deterministic_and_moves_with_the_adapter(tiny_model_dir, eight_images, tmp_path):
    cfg = val_cfg(tiny_model_dir, eight_images, tmp_path)
    _, events, first = train(cfg)
    _, _, second = train(cfg)
    a, b = validations(first), validations(second)
    assert [v.step for v in a] == [0, 2, 4, 6, 8]
    assert [(v.loss, v.per_timestep) for v in a] == [(v.loss, v.per_timestep) for v in b], "same run, same numbers"
    assert set(a[0].per_timestep) == {"200", "400", "600", "800"}
    assert len({v.loss for v in a}) == len(a), "it changes as the adapter trains"
    train_losses = {e.step: e.loss for e in events if isinstance(e, Progress)}
    assert all(v.loss != train_losses.get(v.step) for v in a)
    with (first / "events.jsonl").open() as f:
        assert any(json.loads(line).get("type") == "validation" for line in f)
    assert all(isinstance(e.loss_ema, float) for e in events if isinstance(e, Progress))


def test_the_same_adapter_evaluated_twice_gives_the_same_value(tiny_model_dir, eight_images, tmp_path):
    from trainer.loop import Trainer
    cfg = val_cfg(tiny_model_dir, eight_images, tmp_path, **{"schedule.max_steps": 2})
    trainer = Trainer(cfg, runs.create_run_dir(cfg))
    trainer.run()
    assert trainer.validator.loss() == trainer.validator.loss()


def test_metadata_counts_only_training_images(tiny_model_dir, eight_images, tmp_path):
    from safetensors import safe_open
    path, _, _ = train(val_cfg(tiny_model_dir, eight_images, tmp_path))
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["ss_num_train_images"] == "6"


def test_the_best_checkpoint_is_kept_recorded_and_exported(tiny_model_dir, eight_images, tmp_path, capsys):
    cfg = val_cfg(tiny_model_dir, eight_images, tmp_path, **{"schedule.max_steps": 12, "saving.every_n_steps": 2,
                                                              "optimizer.unet_lr": 5e-2})
    _, _, run_dir = train(cfg)
    info = runs.run_info(run_dir)
    at_checkpoints = {v.step: v.loss for v in validations(run_dir) if v.step > 0 and v.step % 2 == 0}
    assert info.best_step == min(at_checkpoints, key=at_checkpoints.get)
    best_dir = run_dir / "checkpoints" / f"step-{info.best_step:06d}"
    assert best_dir.is_dir(), "the best checkpoint survives saving.keep_last"
    out = tmp_path / "best.safetensors"
    assert main(["export", str(run_dir), "--step", "best", "--dtype", "fp32", "--out", str(out)]) == 0
    want = load_file(str(best_dir / "adapter.safetensors"))
    got = load_file(str(out))
    assert want.keys() == got.keys() and all((want[k] == got[k]).all() for k in want)
    assert main(["export", str(run_dir), "--step", "999", "--out", str(out)]) == 2
    assert "no checkpoint at step 999" in capsys.readouterr().err
    from app import generation as G
    from app import runview as V
    from app.settings import AppSettings
    labels = [label for label, _ in G.adapter_choices(AppSettings(runs_dir=run_dir.parent,
                                                                  adapters_dir=tmp_path / "a"))]
    final_at = labels.index(f"{run_dir.name} (final)")
    assert labels[final_at + 1] == f"{run_dir.name} / step-{info.best_step:06d} (best validation loss)", \
        "the best checkpoint is offered right beside the final adapter"
    assert len(labels) == 1 + len(runs.checkpoint_dirs(run_dir)), "listed once"
    downloaded = G.export_run_adapter(run_dir, tmp_path / "exports", "kohya", "fp32", step="best")  # the button
    assert downloaded.name == f"t-step-{info.best_step}-best-kohya-fp32.safetensors"
    got = load_file(str(downloaded))
    assert want.keys() == got.keys() and all((want[k] == got[k]).all() for k in want)
    view = V.run_view(run_dir)
    assert len(view.validations) == len(validations(run_dir))
    assert f"(best checkpoint: step {info.best_step})" in V.status_text(view)
    assert set(V.loss_frame(view.losses, view.validations)["curve"]) == {"raw", "smoothed", V.VALIDATION_CURVE}


def test_patience_stops_a_run_that_stopped_improving(tiny_model_dir, eight_images, tmp_path, monkeypatch):
    from trainer.validation import Validator
    scripted = iter([1.0, 0.9, 0.8, 0.85, 0.86, 0.7, 0.6])  # no better than 0.8 twice in a row after step 4
    monkeypatch.setattr(Validator, "loss", lambda self: (v := next(scripted), {"500": v}))
    cfg = val_cfg(tiny_model_dir, eight_images, tmp_path, **{"schedule.max_steps": 40, "validation.patience": 2})
    _, events, run_dir = train(cfg)
    assert [v.step for v in validations(run_dir)] == [0, 2, 4, 6, 8]
    info = runs.run_info(run_dir)
    assert info.state == "stopped" and info.step == 8 and info.best_step == 4


def test_on_the_demo_concept_the_validation_loss_falls(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = C.load(ROOT / "presets" / "tiny-demo.toml",
                 [f"saving.runs_dir={tmp_path}", "sampling.every_n_steps=0", "validation.split=0.25",
                  "validation.every_n_steps=50", "schedule.max_steps=150", "dataset.regularization_path="])
    _, _, run_dir = train(C.check(cfg))
    losses = [(v.step, v.loss) for v in validations(run_dir)]
    print("validation loss by step:", [(s, round(v, 4)) for s, v in losses])
    assert losses[0][0] == 0 and losses[-1][1] < losses[0][1]


def test_compare_draws_every_checkpoint_with_its_validation_loss(tiny_model_dir, eight_images, tmp_path, capsys):
    from PIL import Image
    from trainer.adapters.compare import _row_label
    cfg = val_cfg(tiny_model_dir, eight_images, tmp_path, **{"sampling.prompts": ["a red square", "zqx"],
                                                              "sampling.steps": 2, "saving.keep_last": 3})
    _, _, run_dir = train(cfg)
    out = tmp_path / "grid.png"
    assert main(["compare", str(run_dir), "--seeds", "1,2,3", "--size", "32", "--out", str(out)]) == 0
    grid = Image.open(out)
    checkpoints = runs.checkpoint_dirs(run_dir)
    assert len(checkpoints) == 2  # steps 4 and 8
    assert grid.height >= 2 * 32 and grid.width >= 6 * 32  # 2 rows; 2 prompts x 3 seeds columns
    best = runs.best_checkpoint(run_dir)
    label = _row_label(checkpoints[-1], runs.validation_losses(run_dir), best)
    assert label.startswith("step-000008 val ") and (label.endswith(" best") == (best[1] == 8))
    assert main(["compare", str(run_dir), "--out", str(tmp_path / "grid.jpg")]) == 2
    from app import generation as G
    from app.settings import AppSettings
    from trainer import UserError  # a guarded button shows it as one line
    settings = AppSettings(runs_dir=run_dir.parent, adapters_dir=tmp_path / "a")
    heard = []
    in_app = G.compare_run(settings, run_dir, progress=lambda share, what: heard.append(what))  # the UI's button
    side = G.get_generator(cfg.model.path).base.native_resolution  # the app renders at the model's own size
    assert in_app.height >= 2 * side and in_app.width >= 4 * side, "2 rows; 2 prompts x 2 seeds"
    assert [w for w in heard if ": " not in w] == ["checkpoint 1 of 2 (step-000004)", "checkpoint 2 of 2 (step-000008)",
                                                   "compared 2 checkpoint(s)"], heard  # ": " in each step's text
    plain = val_cfg(tiny_model_dir, eight_images, tmp_path, **{"validation.split": 0.0, "run.name": "plain"})
    _, _, plain_dir = train(plain)
    with pytest.raises(UserError, match="no validation loss, so no best checkpoint"):
        G.export_run_adapter(plain_dir, tmp_path / "exports", step="best")


def test_tensorboard_gets_losses_validation_and_samples(tiny_model_dir, eight_images, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg = val_cfg(tiny_model_dir, eight_images, tmp_path, **{"logging.tensorboard": True, "sampling.every_n_steps": 4,
                                                              "sampling.steps": 2, "sampling.prompts": ["zqx"]})
    run_dir = runs.create_run_dir(cfg)
    from trainer.job import run_here
    assert run_here(run_dir) == 0
    folders = [p.parent for p in (run_dir / "tensorboard").rglob("events.out.tfevents.*")]
    assert folders, "an event file under RUN_DIR/tensorboard"
    acc = EventAccumulator(str(folders[0])).Reload()
    tags = acc.Tags()
    assert {"train/loss", "train/lr", "validation/loss"} <= set(tags["scalars"]) and tags["images"]
    assert [e.step for e in acc.Scalars("validation/loss")] == [v.step for v in validations(run_dir)]



def test_samples_are_rendered_from_the_exported_file(tiny_model_dir, image_dir, tmp_path):
    """Item 6: a training sample equals a plain diffusers pipeline with the exported fp16 file fused, within 1e-3
    (images and latents); a sample of the live fp32 LoRA would not. The trained factors are replaced by a strong
    adapter whose A lies in fp16's subnormal range (B scaled up as much): exact in fp32, a few % off in the fp16
    file. The tiny VAE hides most of that in the image (2e-4), so the latents show it (9e-3)."""
    import numpy as np
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    from trainer.loop import Trainer
    cfg = make_cfg(tiny_model_dir, image_dir, tmp_path, **{
        "saving.dtype": "fp16", "schedule.max_steps": 4, "sampling.steps": 4,
        "sampling.prompts": ["zqx", "a red square"]})
    trainer = Trainer(cfg, runs.create_run_dir(cfg))
    trainer.run()
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for name, p in trainer.params.named().items():
            p.copy_(torch.randn(p.shape, generator=g) * 2.0 ** (-20 if "lora_A" in name else 13))
    path = trainer.export_final()
    weights = {k: v.clone() for k, v in trainer.base.denoiser.state_dict().items()}
    ours = {kind: trainer.sample_images(output_type=kind) for kind in ("np", "latent")}
    assert all(torch.equal(v, trainer.base.denoiser.state_dict()[k]) for k, v in weights.items()), \
        "sampling restores every weight, the live LoRA included, bit for bit"

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora()

    def render(pipeline, i: int, kind: str):
        with torch.no_grad():
            image = pipeline(cfg.sampling.prompts[i], generator=torch.Generator().manual_seed(cfg.sampling.seed + i),
                             num_inference_steps=4, guidance_scale=cfg.sampling.guidance, height=32, width=32,
                             output_type=kind).images[0]
        return np.asarray(image.cpu() if kind == "latent" else image)

    for i in range(2):
        for kind in ("np", "latent"):
            assert np.abs(np.asarray(ours[kind][i]) - render(pipe, i, kind)).max() < 1e-3, (i, kind)
    live = render(trainer.base.pipeline(), 0, "latent")
    assert np.abs(live - np.asarray(ours["latent"][0])).max() > 3e-3, "the live fp32 LoRA renders other latents"
