"""The engine end to end on a tiny model: no-op init, falling loss, determinism, resume, stop, NaN, events."""
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from tiny import tiny_components
from trainer import config as C
from trainer import runs
from trainer.events import EventLog, Failed, Finished, Progress, SampleWritten, Started, read_events
from trainer.loop import Trainer
from trainer.network import inject_lora


def make_cfg(model_dir, data_dir, tmp_path, **overrides) -> C.TrainConfig:
    cfg = C.TrainConfig()
    values = {"model.path": str(model_dir), "dataset.path": str(data_dir), "dataset.resolution": 32,
              "dataset.batch_size": 2, "dataset.trigger": "zqx", "network.rank": 4, "network.alpha": 4.0,
              "optimizer.unet_lr": 1e-3, "optimizer.text_encoder_lr": 1e-3, "schedule.max_steps": 6,
              "schedule.lr_scheduler": "constant", "saving.runs_dir": str(tmp_path / "runs"), "run.name": "t",
              "saving.dtype": "fp32"}
    values.update(overrides)
    for key, value in values.items():
        C.set_value(cfg, key, value)
    return C.check(cfg)


def train(cfg, run_dir=None, resume=False, on_event=None):
    run_dir = run_dir or runs.create_run_dir(cfg)
    events = []
    trainer = Trainer(cfg, run_dir, callbacks=[EventLog(run_dir / "events.jsonl"), events.append])
    if on_event:
        trainer.callbacks.append(lambda e: on_event(trainer, e))
    path = trainer.run(resume=resume)
    return path, events, run_dir


def stopped_and_resumed(cfg, at: int = 3):
    """An uninterrupted run of cfg, and one stopped after step `at` then resumed: (the uninterrupted adapter, the
    resumed adapter, the resumed attempt's events, the stopped run's folder)."""
    full, _, _ = train(cfg)

    def stop(trainer, event):
        if isinstance(event, Progress) and event.step == at:
            trainer.inbox.request("stop")

    _, _, run_dir = train(cfg, on_event=stop)
    stopped_at = runs.last_checkpoint(run_dir).name
    resumed, events, _ = train(cfg, run_dir=run_dir, resume=True)
    return full, resumed, events, run_dir, stopped_at


def tensors(path):
    return load_file(str(path))


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].numpy().tobytes() == b[k].numpy().tobytes(), k


# ----------------------------------------------------------------------------------------------------------------

def test_lora_at_init_is_a_no_op():
    parts = tiny_components(0)
    unet, te, tok = parts["unet"], parts["text_encoder"], parts["tokenizer"]
    torch.manual_seed(1)
    sample, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    ids = tok(["a red circle", "zqx"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = te(ids).last_hidden_state
        before = unet(sample, t, hidden).sample
    cfg = C.TrainConfig()
    C.apply_overrides(cfg, ["network.unet_targets=['attention', 'feed_forward', 'projections']",
                            "network.text_encoder_targets=['attention', 'mlp']"])
    from trainer.models import get_family
    params = inject_lora(SimpleNamespace(denoiser=unet, text_encoders={"lora_te": te}, family=get_family("sd1")), cfg)
    assert len(params.unet) > 0 and len(params.text_encoders["text_encoder"]) > 0
    assert all(p.abs().sum() > 0 for n, p in params.unet.items() if "lora_A" in n), "A starts random"
    assert all(p.abs().sum() == 0 for n, p in params.unet.items() if "lora_B" in n), "B starts at zero"
    with torch.no_grad():
        hidden_after = te(ids).last_hidden_state
        after = unet(sample, t, hidden_after).sample
    assert (hidden_after - hidden).abs().max() < 1e-6
    assert (after - before).abs().max() < 1e-6
    frozen = [n for n, p in unet.named_parameters() if p.requires_grad and "lora_" not in n]
    assert frozen == [], "every base weight is frozen"


def test_loss_falls(tiny_model_dir, image_dir, tmp_path):
    cfg = make_cfg(tiny_model_dir, image_dir, tmp_path, **{"schedule.max_steps": 40, "optimizer.unet_lr": 3e-3,
                                                           "network.text_encoders": [], "dataset.batch_size": 4})
    path, events, _ = train(cfg)
    losses = [e.loss for e in events if isinstance(e, Progress)]
    assert len(losses) == 40
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    print(f"mean loss first 10 steps {first:.4f}, last 10 steps {last:.4f}")
    assert last < first
    assert path.exists()


def test_same_config_and_seed_give_identical_adapters(tiny_model_dir, image_dir, tmp_path):
    cfg = make_cfg(tiny_model_dir, image_dir, tmp_path, **{"dataset.caption_dropout": 0.3,
                                                           "network.dropout": 0.1})
    a, _, _ = train(cfg)
    b, _, _ = train(cfg)
    assert_same_tensors(tensors(a), tensors(b))
    C.set_value(cfg, "run.seed", 7)
    c, _, _ = train(cfg)
    assert any(not torch.equal(x, tensors(c)[k]) for k, x in tensors(a).items()), "the seed matters"


def test_stop_then_resume_equals_an_uninterrupted_run(tiny_model_dir, image_dir, tmp_path):
    overrides = {"schedule.max_steps": 8, "schedule.lr_scheduler": "cosine", "schedule.warmup_steps": 2,
                 "dataset.flip": True, "dataset.crop": "random", "network.dropout": 0.1}
    cfg = make_cfg(tiny_model_dir, image_dir, tmp_path, **overrides)
    full, _, _ = train(cfg)

    def stop_at_3(trainer, event):
        if isinstance(event, Progress) and event.step == 3:
            trainer.inbox.request("stop")

    stopped, events, run_dir = train(cfg, on_event=stop_at_3)
    finished = [e for e in events if isinstance(e, Finished)][0]
    assert finished.stopped and finished.step == 3, "the stop request ended the run within one step"
    assert stopped.exists() and len(tensors(stopped)) > 0, "a stopped run still writes a usable adapter"
    assert runs.last_checkpoint(run_dir).name == "step-000003"

    resumed, events, _ = train(cfg, run_dir=run_dir, resume=True)
    assert [e for e in events if isinstance(e, Started)][0].start_step == 3
    assert [e.step for e in events if isinstance(e, Progress)] == [4, 5, 6, 7, 8]
    assert_same_tensors(tensors(full), tensors(resumed))
    assert runs.run_info(run_dir).state == "finished"


def test_nan_loss_stops_with_a_message_and_keeps_the_last_checkpoint(tiny_model_dir, image_dir, tmp_path,
                                                                     monkeypatch):
    import trainer.loop as loop
    real = loop.diffusion_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(loop, "diffusion_loss", poisoned)
    cfg = make_cfg(tiny_model_dir, image_dir, tmp_path, **{"saving.every_n_steps": 2})
    path, events, run_dir = train(cfg)
    assert path is None
    failed = [e for e in events if isinstance(e, Failed)][0]
    assert "nan" in failed.error.lower() and failed.step == 4 and "unet_lr" in failed.advice
    assert failed.last_checkpoint.endswith("step-000004")
    assert not runs.final_adapter_path(run_dir, cfg).exists()
    assert runs.run_info(run_dir).state == "failed"


def test_events_samples_checkpoints_and_metadata(tiny_model_dir, image_dir, tmp_path):
    cfg = make_cfg(tiny_model_dir, image_dir, tmp_path, **{"sampling.every_n_steps": 3, "saving.every_n_steps": 2,
                                                           "saving.keep_last": 2, "sampling.steps": 2,
                                                           "sampling.prompts": ["zqx", "a red square"]})
    run_dir = runs.create_run_dir(cfg)
    trainer = Trainer(cfg, run_dir, callbacks=[EventLog(run_dir / "events.jsonl")])
    path = trainer.run()
    logged = read_events(run_dir / "events.jsonl")
    kinds = [e.kind for e in logged]
    assert kinds[0] == "started" and kinds[-1] == "finished" and kinds.count("progress") == 6
    samples = [e for e in logged if isinstance(e, SampleWritten)]
    assert [s.step for s in samples] == [3, 6] and all(len(s.paths) == 2 for s in samples)
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == [
        "step-000003-0.png", "step-000003-1.png", "step-000006-0.png", "step-000006-1.png"]
    assert [p.name for p in runs.checkpoint_dirs(run_dir)] == ["step-000004", "step-000006"], "keep the last 2"
    recorded = C.load(run_dir / "config.toml")
    assert recorded.precision.cpu_threads == 1, "the thread count it picked (the tests' OMP_NUM_THREADS) is kept"
    recorded.precision.cpu_threads = cfg.precision.cpu_threads
    assert recorded == cfg, "the rest is the config as given (its folders are absolute already)"
    progress = [e for e in logged if isinstance(e, Progress)]
    assert all(e.it_per_s > 0 and e.eta_s >= 0 and e.lr > 0 for e in progress)
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "4" and meta["ss_output_name"] == "t" and meta["ss_seed"] == "42"
    assert json.loads(meta["ss_tag_frequency"])
    assert not list(run_dir.rglob("*.tmp")), "no temporary files left behind"


def test_bf16_autocast_runs_on_cpu(tiny_model_dir, image_dir, tmp_path):
    cfg = make_cfg(tiny_model_dir, image_dir, tmp_path, **{"precision.mixed": "bf16", "schedule.max_steps": 2,
                                                           "loss.min_snr_gamma": 5.0, "loss.noise_offset": 0.05,
                                                           "schedule.gradient_accumulation": 2})
    path, events, _ = train(cfg)
    assert path is not None and path.exists()
    assert all(torch.isfinite(t).all() for t in tensors(path).values())
    cfg = make_cfg(tiny_model_dir, image_dir, tmp_path, **{"schedule.max_steps": 2, "loss.high_noise_weight_cap": 50.0})
    path, events, _ = train(cfg)
    assert path is not None and all(torch.isfinite(t).all() for t in tensors(path).values())


def test_high_noise_weights_are_the_v_loss_weighting_capped():
    from diffusers import DDPMScheduler

    from trainer.losses import high_noise_weights, min_snr_weights
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([0, 300, 600, 999])
    alpha_bar = sched.alphas_cumprod[t]
    eps_w = high_noise_weights(sched, t, 50.0, "epsilon")
    assert torch.allclose(eps_w[:3], 1 / alpha_bar[:3]) and eps_w[3] == 50.0  # 1/alpha_bar(999) is about 213
    assert eps_w[0] < 1.01 and bool((eps_w[1:] > eps_w[:-1]).all())  # more weight as the noise grows
    v_w = high_noise_weights(sched, t, 50.0, "v_prediction")  # the v loss already carries 1/alpha_bar
    assert torch.allclose(v_w[:3], torch.ones(3)) and torch.allclose(v_w[3], 50.0 * alpha_bar[3])
    assert not torch.allclose(eps_w, min_snr_weights(sched, t, 5.0, "epsilon"))


def test_each_image_trains_the_same_way_in_any_batch():
    """Issue 16's exactness rests on this: image i's noise and timestep come from its own generator, so its loss
    does not depend on what else shares its batch (or its process)."""
    from diffusers import DDPMScheduler

    from trainer.losses import diffusion_loss, loss_weights
    from trainer.models.noise import DdpmNoise
    base = SimpleNamespace(noise_scheduler=DDPMScheduler(), predict=lambda noisy, t, hidden: 0.5 * noisy)
    cfg, latents = C.TrainConfig(), torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    C.set_value(cfg, "loss.noise_offset", 0.1)
    C.set_value(cfg, "loss.min_snr_gamma", 5.0)
    process = DdpmNoise(base.noise_scheduler, "epsilon", cfg.loss)

    def gens(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]
    together = diffusion_loss(base, latents, None, gens(1, 2, 3), process)
    alone = torch.cat([diffusion_loss(base, latents[i:i + 1], None, gens(s), process)
                       for i, s in enumerate((1, 2, 3))])
    assert together.shape == (3,) and torch.equal(together, alone)
    assert not torch.equal(together, diffusion_loss(base, latents, None, gens(2, 1, 3), process))
    items = [SimpleNamespace(regularization=r) for r in (False, True)]
    assert loss_weights(items, 0.5).tolist() == [1.0, 0.5]


def test_regularization_folder_trains_beside_the_dataset(tiny_model_dir, image_dir, tmp_path):
    from tiny import make_images
    reg = make_images(tmp_path / "reg", n=2)
    cfg = make_cfg(tiny_model_dir, image_dir, tmp_path, **{"dataset.regularization_path": str(reg),
                                                           "loss.prior_loss_weight": 0.5, "schedule.max_steps": 4})
    run_dir = runs.create_run_dir(cfg)
    trainer = Trainer(cfg, run_dir)
    path = trainer.run()
    seen = [trainer.micro_batch(b) for b in range(trainer.plan.steps_per_epoch)]
    weights = torch.cat([batch[2] for batch in seen])
    assert sorted(weights.tolist()) == [0.5] * 4 + [1.0] * 4, "an epoch: 4 training and 4 regularization images"
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_num_train_images"] == "4" and meta["ss_num_reg_images"] == "2"
    assert meta["ss_prior_loss_weight"] == "0.5"
    assert "reg" not in json.loads(meta["ss_tag_frequency"])


def test_fp16_and_8bit_need_cuda(tiny_model_dir, image_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from trainer import check_config
    for override in ({"precision.mixed": "fp16"}, {"optimizer.name": "adamw8bit"}):
        cfg = make_cfg(tiny_model_dir, image_dir, tmp_path, **override)
        with pytest.raises(C.ConfigError, match="CUDA"):
            check_config(cfg)  # what the CLI and start_run call before a run folder exists


def test_adafactor_and_epochs(tiny_model_dir, image_dir, tmp_path):
    cfg = make_cfg(tiny_model_dir, image_dir, tmp_path, **{"optimizer.name": "adafactor", "schedule.epochs": 2,
                                                           "dataset.batch_size": 2})
    path, events, _ = train(cfg)
    assert [e for e in events if isinstance(e, Started)][0].total_steps == 4  # 4 images / batch 2 x 2 epochs
    assert path.exists()


def test_latents_and_text_are_cached_when_nothing_random_needs_fresh_pixels(tiny_model_dir, image_dir, tmp_path):
    cfg = make_cfg(tiny_model_dir, image_dir, tmp_path, **{"dataset.cache_latents": "disk",
                                                           "network.text_encoders": [],
                                                           "precision.gradient_checkpointing": True})
    trainer = Trainer(cfg, runs.create_run_dir(cfg))
    assert trainer.run().exists()
    assert trainer.latent_cache is not None and trainer.latent_cache.hits >= 8 and trainer.latent_cache.misses == 4
    assert len(list((image_dir / ".loradesk-cache").rglob("*.safetensors"))) == 4, "one disk entry per image"
    assert len(trainer.text_cache) == 1, "one caption, encoded once"
    assert trainer.base.denoiser.is_gradient_checkpointing

    C.set_value(cfg, "dataset.flip", True)  # random flips need fresh pixels: no latent cache
    trainer = Trainer(cfg, runs.create_run_dir(cfg))
    trainer.run()
    assert trainer.latent_cache is None


def test_v_prediction_is_read_from_the_scheduler_config(tiny_model_dir, image_dir, tmp_path):
    import shutil
    model = shutil.copytree(tiny_model_dir, tmp_path / "vpred")
    sched = model / "scheduler" / "scheduler_config.json"
    sched.write_text(sched.read_text().replace('"epsilon"', '"v_prediction"'))
    cfg = make_cfg(model, image_dir, tmp_path, **{"schedule.max_steps": 2})
    trainer = Trainer(cfg, runs.create_run_dir(cfg))
    assert trainer.run().exists()
    assert trainer.prediction == "v_prediction"
    C.set_value(cfg, "model.path", str(tiny_model_dir))
    trainer = Trainer(cfg, runs.create_run_dir(cfg))
    trainer.run()
    assert trainer.prediction == "epsilon"


def test_prodigy_optimizer(tiny_model_dir, image_dir, tmp_path):
    pytest.importorskip("prodigyopt", reason="the prodigy extra is not installed")
    cfg = make_cfg(tiny_model_dir, image_dir, tmp_path, **{"optimizer.name": "prodigy", "optimizer.unet_lr": 1.0,
                                                           "optimizer.text_encoder_lr": 1.0,
                                                           "schedule.max_steps": 2})
    path, _, _ = train(cfg)
    assert path.exists()


def test_latents_do_not_depend_on_what_the_disk_cache_already_holds(tiny_model_dir, image_dir, tmp_path):
    cfg = make_cfg(tiny_model_dir, image_dir, tmp_path, **{"dataset.cache_latents": "disk", "run.seed": 7,
                                                           "schedule.max_steps": 2})
    fresh, _, _ = train(cfg)
    import shutil
    shutil.rmtree(image_dir / ".loradesk-cache")
    C.set_value(cfg, "run.seed", 42)
    train(cfg)  # fills the cache under another seed
    C.set_value(cfg, "run.seed", 7)
    warm, _, _ = train(cfg)
    assert_same_tensors(tensors(fresh), tensors(warm))


def test_epochs_never_spill_into_the_next_epoch():
    from trainer.loop import micro_batches, total_steps
    cfg = C.apply_overrides(C.TrainConfig(), ["schedule.epochs=2", "schedule.gradient_accumulation=3"])
    assert total_steps(cfg, 4) == 4
    assert [micro_batches(cfg, s, 4) for s in range(4)] == [[0, 1, 2], [3], [4, 5, 6], [7]]
    C.set_value(cfg, "schedule.epochs", 0)
    assert [micro_batches(cfg, s, 4) for s in range(2)] == [[0, 1, 2], [3, 4, 5]]


# ---- per-step cost (issue 23, item 24) --------------------------------------------------------------------------

def _count_calls(monkeypatch, cls, name):
    """Counts calls of cls.name (the real method still runs)."""
    real, calls = getattr(cls, name), []

    def counted(self, *args, **kwargs):
        calls.append(args[0].shape[0] if args and hasattr(args[0], "shape") else None)
        return real(self, *args, **kwargs)
    monkeypatch.setattr(cls, name, counted)
    return calls


def test_the_vae_encodes_each_batch_in_one_call(tiny_model_dir, image_dir, tmp_path, monkeypatch):
    """Pixels that change every step (a random flip: no latent cache) are encoded one call per batch, not one per
    image: on the CPU each call costs its own pass through every layer."""
    from diffusers import AutoencoderKL
    calls = _count_calls(monkeypatch, AutoencoderKL, "encode")
    cfg = make_cfg(tiny_model_dir, image_dir, tmp_path, **{"dataset.flip": True, "dataset.batch_size": 4,
                                                           "schedule.max_steps": 3, "sampling.every_n_steps": 0})
    path, _, _ = train(cfg)
    assert path.exists()
    assert calls == [4, 4, 4], f"VAE encode calls (images per call) over 3 steps of 4 images: {calls}"


def test_cached_latents_are_each_images_own_whatever_batch_it_first_came_in(tiny_model_dir, image_dir, tmp_path):
    """A cached posterior is encoded from its image alone: CPU convolutions round differently by batch size (about
    5e-6 here), so a posterior encoded beside others would make a resumed run (empty memory cache) or a disk cache
    filled under another seed differ in the last bits. A resume over several epochs with the memory cache is exact."""
    cfg = make_cfg(tiny_model_dir, image_dir, tmp_path, **{"dataset.cache_latents": "memory",
                                                           "schedule.max_steps": 8, "sampling.every_n_steps": 0})
    full, _, _ = train(cfg)

    def stop_at_3(trainer, event):
        if isinstance(event, Progress) and event.step == 3:
            trainer.inbox.request("stop")

    _, _, run_dir = train(cfg, on_event=stop_at_3)
    resumed, _, _ = train(cfg, run_dir=run_dir, resume=True)
    assert_same_tensors(tensors(full), tensors(resumed))


def test_batched_and_single_posteriors_agree_within_float_tolerance(tiny_model_dir, image_dir, tmp_path):
    cfg = make_cfg(tiny_model_dir, image_dir, tmp_path, **{"schedule.max_steps": 1})
    trainer = Trainer(cfg, runs.create_run_dir(cfg))
    trainer.run()
    torch.manual_seed(0)
    pixels = torch.rand(4, 3, 32, 32) * 2 - 1
    together = trainer.encode_pixels(pixels)
    alone = torch.cat([trainer.encode_pixels(pixels[i:i + 1]) for i in range(4)])
    assert together.shape == alone.shape and together.shape[:2] == (4, 8)
    print(f"batched vs one at a time: max |difference| {(together - alone).abs().max().item():.2e}")
    assert torch.allclose(together, alone, rtol=0, atol=1e-4)


def test_the_frozen_dtype_is_read_once_not_every_step(tiny_model_dir, image_dir, tmp_path, monkeypatch):
    """diffusers' ModelMixin.dtype walks every submodule on each read (3% of a CPU step); the frozen weights keep
    the dtype they were placed in, so the loop reads it once."""
    from diffusers import ModelMixin
    real, reads = ModelMixin.dtype, []
    monkeypatch.setattr(ModelMixin, "dtype", property(lambda self: reads.append(1) or real.fget(self)))
    counts = []
    for steps in (2, 6):
        reads.clear()
        cfg = make_cfg(tiny_model_dir, image_dir, tmp_path, **{"schedule.max_steps": steps, "dataset.flip": True,
                                                               "sampling.every_n_steps": 0})
        train(cfg)
        counts.append(len(reads))
    assert counts[0] == counts[1], f"ModelMixin.dtype read {counts[0]} times in 2 steps, {counts[1]} in 6"
