"""The ss_* and modelspec.* metadata sd-scripts writes, so A1111's LoRA browser and civitai show our files alike."""
from __future__ import annotations

import datetime
import json

from trainer.config import global_batch, trains_text_encoders

from .layout import check_metadata


def build_metadata(*, cfg, num_train_images: int, tag_frequency: dict, started_at: float, finished_at: float,
                   family: dict[str, str], num_reg_images: int = 0, title: str | None = None,
                   max_train_steps: int | None = None, num_epochs: int | None = None, steps: int | None = None,
                   prediction: str | None = None) -> dict[str, str]:
    """A flat dict of strings. `family`: the base model family's values (BaseModel.metadata(): ss_base_model_version,
    ss_v2, modelspec.architecture and .implementation); `max_train_steps`/`num_epochs` default to the config's (pass
    the resolved ones); `steps` is how many steps were trained (kohya's ss_steps; fewer than ss_max_train_steps
    for a stopped run); `prediction` the one trained with (default: loss.prediction, epsilon for auto)."""
    from trainer import __version__

    net, opt, res = cfg.network, cfg.optimizer, cfg.dataset.resolution
    prediction = prediction or (cfg.loss.prediction if cfg.loss.prediction != "auto" else "epsilon")
    network_args = {"unet_targets": net.unet_targets, "text_encoders": net.text_encoders,
                    "text_encoder_targets": net.text_encoder_targets,
                    "dropout": net.dropout, "init": net.init}
    module = "networks.lora"
    lycoris = lycoris_network_args(net)
    if lycoris:
        module = "lycoris.kohya"
        network_args.update(lycoris)
    meta = {
        "ss_network_module": module,
        "ss_network_dim": str(net.rank),
        "ss_network_alpha": str(float(net.alpha)),
        "ss_network_args": json.dumps(network_args),
        "ss_network_train_unet_only": str(not trains_text_encoders(cfg)),
        "ss_resolution": f"({res}, {res})",
        "ss_num_train_images": str(num_train_images),
        "ss_num_reg_images": str(num_reg_images),
        "ss_prior_loss_weight": str(float(cfg.loss.prior_loss_weight)),
        "ss_learning_rate": str(opt.unet_lr),
        "ss_unet_lr": str(opt.unet_lr),
        "ss_text_encoder_lr": str(opt.text_encoder_lr if trains_text_encoders(cfg) else 0.0),
        "ss_optimizer": opt.name,
        "ss_lr_scheduler": cfg.schedule.lr_scheduler,
        "ss_max_train_steps": str(max_train_steps if max_train_steps is not None else cfg.schedule.max_steps),
        "ss_num_epochs": str(num_epochs if num_epochs is not None else cfg.schedule.epochs),
        "ss_steps": str(steps if steps is not None else max_train_steps if max_train_steps is not None
                        else cfg.schedule.max_steps),
        "ss_seed": str(cfg.run.seed),
        # kohya's keys: images per process per micro-batch, and per optimizer step over every process
        "ss_batch_size_per_device": str(cfg.dataset.batch_size),
        "ss_total_batch_size": str(global_batch(cfg)),
        "ss_gradient_accumulation_steps": str(cfg.schedule.gradient_accumulation),
        "ss_mixed_precision": cfg.precision.mixed,
        "ss_noise_offset": str(cfg.loss.noise_offset),
        "ss_min_snr_gamma": str(cfg.loss.min_snr_gamma),
        "ss_tag_frequency": json.dumps(tag_frequency, ensure_ascii=False),
        "ss_output_name": cfg.run.name,
        "ss_training_started_at": str(started_at),
        "ss_training_finished_at": str(finished_at),
        "modelspec.sai_model_spec": "1.0.1",  # what current sd-scripts writes
        "modelspec.title": title or cfg.run.name,
        "modelspec.date": datetime.datetime.fromtimestamp(int(finished_at)).isoformat(),
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.prediction_type": "v" if prediction == "v_prediction" else "epsilon",
        "loradesk_version": __version__,
    }
    meta.update(family)
    return check_metadata(meta, "build_metadata")


# network.type -> LyCORIS's algo (lycoris/kohya.py create_network: kwargs "algo", "conv_dim", "conv_alpha", "factor",
# "dora_wd", "wd_on_output", lines 50-68)
_ALGOS = {"locon": "locon", "loha": "loha", "lokr": "lokr", "lora": "lora"}


def lycoris_network_args(net) -> dict[str, str]:
    """The --network_args a LyCORIS training of this network would be given, as sd-scripts records them in
    ss_network_args (train_network.py: json.dumps(net_kwargs), each value the string after '='); {} for plain LoRA,
    whose metadata stays sd-scripts' networks.lora."""
    kind, dora = net.type, net.dora
    if kind == "lora" and not dora:
        return {}
    args = {"algo": _ALGOS[kind]}
    from trainer.config import trains_convolutions
    if trains_convolutions(net):  # the k x k convolutions' rank and alpha (0: the linear layers')
        args["conv_dim"] = str(net.conv_rank or net.rank)
        args["conv_alpha"] = str(net.conv_alpha or net.alpha)
    else:  # said, not left out: LyCORIS reads a missing conv_dim as network_dim (kohya.py:50), 0 as none (:376)
        args["conv_dim"] = "0"
    if kind in ("loha", "lokr") and net.tucker:
        args["use_tucker"] = "True"  # LyCORIS's name (kohya.py network args)
    if kind == "lokr":
        args["factor"] = str(net.factor)
        args["decompose_both"] = str(net.decompose_both)
    if dora:
        args["dora_wd"] = "True"
        # LyCORIS normalises per output row unless wd_on_output=False (kohya.py:68, modules/locon.py:116-135)
        args["wd_on_output"] = str(net.dora_axis != "in")
    return args
