"""The families' noise processes (trainer/models/noise.py): DDPM exactly as the loss always drew and weighed it,
rectified flow as the SD3 paper and diffusers' training utilities define it."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from trainer import config as C


def _old_diffusion_loss(base, latents, cond, gens, cfg, prediction):
    """trainer/losses.py diffusion_loss as it was before the noise process moved to the family (verbatim): the
    reference DdpmNoise must equal to the last bit."""
    from trainer.models.noise import high_noise_weights, min_snr_weights
    sched = base.noise_scheduler
    noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in gens])
    if cfg.loss.noise_offset:
        offsets = torch.stack([torch.randn((latents.shape[1], 1, 1), generator=g) for g in gens])
        noise = noise + cfg.loss.noise_offset * offsets
    timesteps = torch.cat([torch.randint(0, sched.config.num_train_timesteps, (1,), generator=g) for g in gens])
    noise, timesteps = noise.to(latents.device), timesteps.to(latents.device)
    noisy = sched.add_noise(latents, noise, timesteps)
    target = noise if prediction == "epsilon" else sched.get_velocity(latents, noise, timesteps)
    pred = base.predict(noisy, timesteps, cond)
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if cfg.loss.min_snr_gamma:
        loss = loss * min_snr_weights(sched, timesteps, cfg.loss.min_snr_gamma, prediction)
    if cfg.loss.high_noise_weight_cap:
        loss = loss * high_noise_weights(sched, timesteps, cfg.loss.high_noise_weight_cap, prediction)
    return loss


def _old_fixed_noise_loss(base, latents, cond, noise, timestep, prediction):
    sched = base.noise_scheduler
    t = torch.full((latents.shape[0],), int(timestep), dtype=torch.long, device=latents.device)
    noisy = sched.add_noise(latents, noise, t)
    target = noise if prediction == "epsilon" else sched.get_velocity(latents, noise, t)
    return F.mse_loss(base.predict(noisy, t, cond).float(), target.float()).item()


def _base(**sched_kwargs):
    from diffusers import DDPMScheduler
    weight = torch.randn(4, 4, generator=torch.Generator().manual_seed(7))

    def predict(noisy, t, cond):  # something that depends on the timestep and mixes channels, like a denoiser
        return torch.einsum("oc,bchw->bohw", weight, noisy) * (1 + t.float().view(-1, 1, 1, 1) / 1000)
    return SimpleNamespace(noise_scheduler=DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                         beta_end=0.012, **sched_kwargs), predict=predict)


def _gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _loss_cfg(**values):
    cfg = C.TrainConfig()
    for key, value in values.items():
        C.set_value(cfg, f"loss.{key}", value)
    return cfg


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("settings", [{}, {"noise_offset": 0.05, "min_snr_gamma": 5.0},
                                      {"noise_offset": 0.1, "high_noise_weight_cap": 50.0},
                                      {"min_snr_gamma": 5.0, "zero_snr": True}])
def test_ddpm_noise_is_the_old_diffusion_loss_to_the_last_bit(prediction, settings):
    from trainer.models.noise import DdpmNoise
    settings = dict(settings)
    base = _base(rescale_betas_zero_snr=settings.pop("zero_snr", False))
    cfg = _loss_cfg(**settings)
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    process = DdpmNoise(base.noise_scheduler, prediction, cfg.loss)
    new = process.training_loss(base, latents, None, _gens(11, 12, 13))
    old = _old_diffusion_loss(base, latents, None, _gens(11, 12, 13), cfg, prediction)
    assert new.shape == (3,) and torch.equal(new, old)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(3))
    points = process.validation_points(4)
    assert points == [(200, 200), (400, 400), (600, 600), (800, 800)]
    for _, t in points:
        assert process.fixed_noise_loss(base, latents, None, noise, t) == \
            _old_fixed_noise_loss(base, latents, None, noise, t, prediction)


def test_the_sd_families_use_ddpm_with_the_asked_prediction(tiny_model_dir):
    from trainer.models import load_base_model
    from trainer.models.noise import DdpmNoise
    base = load_base_model(str(tiny_model_dir))
    cfg = C.TrainConfig()
    auto = base.family.noise_process(base, cfg)
    assert isinstance(auto, DdpmNoise) and auto.prediction == base.prediction_type()
    C.set_value(cfg, "loss.prediction", "v_prediction")
    assert base.family.noise_process(base, cfg).prediction == "v_prediction"
    assert base.denoiser is not None and not hasattr(base, "unet")


def _flow(**values):
    from trainer.models.noise import FlowNoise
    return FlowNoise(_loss_cfg(**values).loss)


def test_flow_noises_toward_the_noise_and_targets_the_velocity():
    process = _flow(timestep_sampling="uniform")
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    draw = process.noised(latents, noise, 0.25)
    assert torch.allclose(draw.noisy, 0.75 * latents + 0.25 * noise) and torch.equal(draw.target, noise - latents)
    assert draw.timesteps.tolist() == [250.0, 250.0]  # FlowMatchEulerDiscreteScheduler: timestep = sigma x 1000
    gens = _gens(5, 6)
    drawn = process.draw(latents, gens)
    again = _gens(5, 6)
    e = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in again])
    s = torch.cat([torch.rand((1,), generator=g) for g in again])  # noise first, then the sigma, per image
    assert torch.allclose(drawn.timesteps, s * 1000)
    assert torch.allclose(drawn.noisy, (1 - s.view(-1, 1, 1, 1)) * latents + s.view(-1, 1, 1, 1) * e)
    assert torch.equal(drawn.target, e - latents) and drawn.weights == ()
    assert [k for k, _ in process.validation_points(4)] == [200, 400, 600, 800]
    assert [p for _, p in process.validation_points(3)] == [0.25, 0.5, 0.75]


def test_flow_hands_the_denoiser_sigma_times_1000():
    seen = {}

    def predict(noisy, t, cond):
        seen["t"] = t
        return noisy
    latents = torch.zeros(2, 4, 4, 4)
    process = _flow(timestep_sampling="uniform", flow_shift=3.0)
    process.training_loss(SimpleNamespace(predict=predict), latents, None, _gens(1, 2))
    again = _gens(1, 2)
    u = torch.cat([(torch.randn((4, 4, 4), generator=g), torch.rand((1,), generator=g))[1] for g in again])
    assert torch.allclose(seen["t"], 3 * u / (1 + 2 * u) * 1000)


def test_the_shift_is_the_schedulers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from trainer.models.noise import shift_sigmas
    s = torch.tensor([0.1, 0.5, 0.9])
    assert torch.allclose(shift_sigmas(s, 3.0), 3 * s / (1 + 2 * s)) and torch.equal(shift_sigmas(s, 1.0), s)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    plain = torch.linspace(1, 1000, 1000).flip(0) / 1000
    assert torch.allclose(sched.sigmas[:-1] if len(sched.sigmas) > 1000 else sched.sigmas, shift_sigmas(plain, 3.0))
    assert torch.allclose(sched.timesteps, sched.sigmas[:1000] * 1000)


@pytest.mark.parametrize("scheme", ["logit_normal", "uniform", "mode"])
@pytest.mark.parametrize("weighting", ["none", "cosmap"])
def test_each_image_draws_from_its_own_generator_alone(scheme, weighting):
    process = _flow(timestep_sampling=scheme, flow_weighting=weighting)
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    base = SimpleNamespace(predict=lambda noisy, t, cond: 0.5 * noisy * (1 + t.view(-1, 1, 1, 1) / 1000))
    together = process.training_loss(base, latents, None, _gens(1, 2, 3))
    alone = torch.cat([process.training_loss(base, latents[i:i + 1], None, _gens(s)) for i, s in enumerate((1, 2, 3))])
    assert together.shape == (3,) and torch.equal(together, alone)
    assert not torch.allclose(together, process.training_loss(base, latents, None, _gens(2, 1, 3)))


def test_logit_normal_sigmas_have_the_asked_logit_mean_and_std():
    from trainer.models.noise import sample_sigma
    gen = torch.Generator().manual_seed(0)
    s = torch.cat([sample_sigma(gen, "logit_normal", 0.5, 0.8) for _ in range(4000)]).double()
    logit = torch.log(s / (1 - s))
    assert abs(logit.mean().item() - 0.5) < 0.06 and abs(logit.std().item() - 0.8) < 0.06
    u = torch.cat([sample_sigma(gen, "uniform") for _ in range(4000)])
    assert abs(u.mean().item() - 0.5) < 0.03 and 0 <= u.min() and u.max() < 1
    m = torch.cat([sample_sigma(gen, "mode", mode_scale=1.29) for _ in range(4000)])
    assert 0 <= m.min() and m.max() <= 1 and ((m - 0.5).abs() < 0.25).float().mean() > 0.5  # a heavier middle


@pytest.mark.parametrize("scheme", ["none", "sigma_sqrt", "cosmap"])
def test_flow_weights_are_diffusers_sd3_weighting(scheme):
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    from trainer.models.noise import flow_weights
    sigmas = torch.tensor([0.05, 0.3, 0.5, 0.77, 0.99])
    assert torch.allclose(flow_weights(sigmas, scheme), compute_loss_weighting_for_sd3(scheme, sigmas))
    process = _flow(timestep_sampling="uniform", flow_weighting=scheme)
    draw = process.draw(torch.zeros(2, 4, 4, 4), _gens(1, 2))
    if scheme == "none":
        assert draw.weights == ()
    else:
        assert torch.allclose(draw.weights[0], compute_loss_weighting_for_sd3(scheme, draw.timesteps / 1000))


def test_flow_settings_are_config_fields_that_say_they_are_for_flow_models():
    fields = {f.key: f for f in C.fields()}
    expected = {"loss.timestep_sampling": "logit_normal", "loss.logit_mean": 0.0, "loss.logit_std": 1.0,
                "loss.mode_scale": 1.29, "loss.flow_shift": 1.0, "loss.flow_weighting": "none"}
    for key, default in expected.items():
        assert fields[key].default == default and "flow" in fields[key].help.lower(), key
    assert fields["loss.timestep_sampling"].choices == ["logit_normal", "uniform", "mode"]
    assert fields["loss.flow_weighting"].choices == ["none", "sigma_sqrt", "cosmap"]
    assert "3.0" in fields["loss.flow_shift"].help
    assert math.isclose(_flow(mode_scale=2.0).cfg.mode_scale, 2.0)


def test_the_loop_and_validation_ask_the_familys_process(tiny_model_dir, image_dir, tmp_path, monkeypatch):
    """No branch on the process outside models/: a family that returns FlowNoise trains and validates with it (the
    tiny SD UNet stands in for a flow denoiser; it takes the float timesteps sigma x 1000)."""
    from test_training import make_cfg, train

    from trainer.events import Finished, Validation
    from trainer.models.family import Family
    from trainer.models.noise import FlowNoise
    seen = []
    real_draw = FlowNoise.draw

    def recording_draw(self, latents, gens):
        draw = real_draw(self, latents, gens)
        seen.append(draw.timesteps)
        return draw
    monkeypatch.setattr(Family, "noise_process", lambda self, base, cfg: FlowNoise(cfg.loss))
    monkeypatch.setattr(FlowNoise, "draw", recording_draw)
    cfg = make_cfg(tiny_model_dir, image_dir, tmp_path, **{"validation.split": 0.34, "validation.every_n_steps": 2,
                                                             "schedule.max_steps": 2, "loss.flow_shift": 3.0,
                                                             "loss.flow_weighting": "cosmap"})
    path, events, _ = train(cfg)
    assert path is not None and any(isinstance(e, Finished) for e in events)
    assert len(seen) == 2 and all(t.dtype.is_floating_point and bool(((t > 0) & (t < 1000)).all()) for t in seen)
    validation = [e for e in events if isinstance(e, Validation)]
    assert validation and set(validation[-1].per_timestep) == {"200", "400", "600", "800"}
    assert all(math.isfinite(v) for v in validation[-1].per_timestep.values())


def test_a_drawn_noise_level_is_never_zero():
    """torch.rand can give exactly 0, and mode sampling near u = 1 gives levels ~0: sigma_sqrt would weigh them
    1/sigma^2 (infinite); the draw stays within the scheduler's levels [1/1000, 1]."""
    from types import SimpleNamespace
    from trainer.models.noise import FlowNoise, MIN_SIGMA
    cfg = SimpleNamespace(timestep_sampling="uniform", logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                          flow_shift=1.0, flow_weighting="sigma_sqrt")
    real_rand = torch.rand
    try:
        torch.rand = lambda *a, **k: torch.zeros(1)
        draw = FlowNoise(cfg).draw(torch.zeros(1, 4, 2, 2), [torch.Generator().manual_seed(0)])
    finally:
        torch.rand = real_rand
    assert draw.timesteps.item() == MIN_SIGMA * 1000 and torch.isfinite(draw.weights[0]).all()
