"""Everything checked before a run folder exists: the config itself and what this machine can do for it.

The CLI (`train`, `validate`) and `trainer.job.start_run` (the app) call `check_config`, so both refuse the same
configs with the same messages, before anything is written.
"""
from __future__ import annotations

import importlib.util

from . import config as C


def machine_problems(cfg: C.TrainConfig) -> list[str]:
    """What this machine cannot do for cfg (no CUDA for fp16 or 8-bit AdamW, a missing optional package)."""
    import torch
    problems = []
    cuda = torch.cuda.is_available()
    if cfg.precision.device == "cuda" and not cuda:
        problems.append("precision.device=cuda but no CUDA GPU is visible; use auto or cpu")
    on_cuda = cuda and cfg.precision.device != "cpu"
    if cfg.precision.mixed == "fp16" and not on_cuda:
        problems.append("precision.mixed=fp16 needs a CUDA GPU; on the CPU use bf16 or no")
    if cfg.optimizer.name == "adamw8bit":
        if not on_cuda:
            problems.append("optimizer.name=adamw8bit needs a CUDA GPU (bitsandbytes); on the CPU use adamw")
        elif importlib.util.find_spec("bitsandbytes") is None:
            problems.append("optimizer.name=adamw8bit needs bitsandbytes: pip install 'loradesk[cuda]'")
    if cfg.optimizer.name == "prodigy" and importlib.util.find_spec("prodigyopt") is None:
        problems.append("optimizer.name=prodigy needs the prodigy extra: pip install 'loradesk[prodigy]'")
    return problems


def config_problems(cfg: C.TrainConfig, check_paths: bool = True) -> list[str]:
    """Every problem with cfg on this machine (empty = it can train here)."""
    problems = C.validate(cfg, check_paths)
    return problems + [p for p in machine_problems(cfg) if p not in problems]


def check_config(cfg: C.TrainConfig, source: str | None = None, check_paths: bool = True) -> C.TrainConfig:
    """config_problems(), raised as one ConfigError naming every problem."""
    problems = config_problems(cfg, check_paths)
    if problems:
        raise C.ConfigError(problems, source)
    return cfg
