"""The ss_* and modelspec.* metadata sd-scripts writes, so A1111's LoRA browser and civitai show our files alike."""
from __future__ import annotations

import datetime
import json

from .layout import check_metadata

_ARCHITECTURES = {"sd_v1": "stable-diffusion-v1", "sd_v2": "stable-diffusion-v2-512",
                  "sdxl_base_v1-0": "stable-diffusion-xl-v1-base"}
# loradesk family names (BaseModel.family) -> the ss_base_model_version sd-scripts writes
_FAMILIES = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


def build_metadata(*, cfg, num_train_images: int, tag_frequency: dict, started_at: float, finished_at: float,
                   num_reg_images: int = 0, base_model_version: str = "sd_v1", title: str | None = None,
                   max_train_steps: int | None = None, num_epochs: int | None = None,
                   steps: int | None = None) -> dict[str, str]:
    """A flat dict of strings. `base_model_version` takes sd-scripts' names or a family ("sd1");
    `max_train_steps`/`num_epochs` default to the config's (pass the resolved ones); `steps` is how many steps
    were trained (kohya's ss_steps; fewer than ss_max_train_steps for a stopped run)."""
    from trainer import __version__

    base_model_version = _FAMILIES.get(base_model_version, base_model_version)
    net, opt, res = cfg.network, cfg.optimizer, cfg.dataset.resolution
    network_args = {"unet_targets": net.unet_targets, "text_encoder_targets": net.text_encoder_targets,
                    "dropout": net.dropout, "init": net.init}
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(net.rank),
        "ss_network_alpha": str(float(net.alpha)),
        "ss_network_args": json.dumps(network_args),
        "ss_network_train_unet_only": str(not net.text_encoder),
        "ss_base_model_version": base_model_version,
        "ss_v2": str(base_model_version.startswith("sd_v2")),
        "ss_resolution": f"({res}, {res})",
        "ss_num_train_images": str(num_train_images),
        "ss_num_reg_images": str(num_reg_images),
        "ss_prior_loss_weight": str(float(cfg.loss.prior_loss_weight)),
        "ss_learning_rate": str(opt.unet_lr),
        "ss_unet_lr": str(opt.unet_lr),
        "ss_text_encoder_lr": str(opt.text_encoder_lr if net.text_encoder else 0.0),
        "ss_optimizer": opt.name,
        "ss_lr_scheduler": cfg.schedule.lr_scheduler,
        "ss_max_train_steps": str(max_train_steps if max_train_steps is not None else cfg.schedule.max_steps),
        "ss_num_epochs": str(num_epochs if num_epochs is not None else cfg.schedule.epochs),
        "ss_steps": str(steps if steps is not None else max_train_steps if max_train_steps is not None
                        else cfg.schedule.max_steps),
        "ss_seed": str(cfg.run.seed),
        "ss_mixed_precision": cfg.precision.mixed,
        "ss_noise_offset": str(cfg.loss.noise_offset),
        "ss_min_snr_gamma": str(cfg.loss.min_snr_gamma),
        "ss_tag_frequency": json.dumps(tag_frequency, ensure_ascii=False),
        "ss_output_name": cfg.run.name,
        "ss_training_started_at": str(started_at),
        "ss_training_finished_at": str(finished_at),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": _ARCHITECTURES.get(base_model_version, base_model_version) + "/lora",
        # sd-scripts' value for SD1/SD2 LoRAs: module names follow diffusers' UNet
        "modelspec.implementation": "diffusers",
        "modelspec.title": title or cfg.run.name,
        "modelspec.date": datetime.datetime.fromtimestamp(int(finished_at)).isoformat(),
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.prediction_type": "v" if cfg.loss.prediction == "v_prediction" else "epsilon",
        "loradesk_version": __version__,
    }
    return check_metadata(meta, "build_metadata")
