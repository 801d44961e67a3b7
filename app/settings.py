"""Where the app keeps things: datasets, runs, uploaded adapters, and which base model it uses by default."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class AppSettings:
    data_dir: Path = Path("datasets")  # one folder per dataset: images + same-name .txt captions
    runs_dir: Path = Path("runs")  # run folders written by the trainer
    adapters_dir: Path = Path("adapters")  # uploaded .safetensors adapters and exported blends
    base_model: str = ""  # "" = the tiny built-in model
    presets_dir: Path = REPO_ROOT / "presets"

    @classmethod
    def from_env(cls, **overrides) -> "AppSettings":
        """Defaults, then LORADESK_* environment variables, then explicit overrides (launch flags)."""
        env = {
            "data_dir": os.environ.get("LORADESK_DATA_DIR"),
            "runs_dir": os.environ.get("LORADESK_RUNS_DIR"),
            "adapters_dir": os.environ.get("LORADESK_ADAPTERS_DIR"),
            "base_model": os.environ.get("LORADESK_BASE_MODEL"),
        }
        values = {k: v for k, v in env.items() if v is not None}
        values.update({k: v for k, v in overrides.items() if v is not None})
        for key in ("data_dir", "runs_dir", "adapters_dir", "presets_dir"):
            if key in values:
                values[key] = Path(values[key]).expanduser()
        return cls(**values)
