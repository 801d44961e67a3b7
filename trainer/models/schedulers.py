"""Schedulers built from a model's scheduler config, so betas and prediction_type always match the model."""
from __future__ import annotations

# name -> diffusers class name; DPM-Solver++ first: good images in ~20 steps, which keeps CPU sampling short
INFERENCE_SCHEDULERS = {
    "dpmsolver": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
}


def training_scheduler(config):
    """The DDPM noise schedule used to add noise during training (keeps betas and prediction_type)."""
    from diffusers import DDPMScheduler
    return DDPMScheduler.from_config(config)


def inference_scheduler(choice, config):
    """None -> DPM-Solver++; a name from INFERENCE_SCHEDULERS; or a scheduler instance, returned as is."""
    import diffusers
    if choice is None:
        choice = "dpmsolver"
    if not isinstance(choice, str):
        return choice
    if choice not in INFERENCE_SCHEDULERS:
        raise ValueError(f"unknown sampler {choice!r}; choose one of {', '.join(INFERENCE_SCHEDULERS)}")
    return getattr(diffusers, INFERENCE_SCHEDULERS[choice]).from_config(config)
