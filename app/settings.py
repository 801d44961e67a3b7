"""Where the app keeps things: datasets, runs, uploaded adapters, and which base model it uses by default."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES_DIR = REPO_ROOT / "examples"  # the shipped demo concept and regularization images


@dataclass(frozen=True)
class AppSettings:
    data_dir: Path = Path("datasets")  # one folder per dataset: images + same-name .txt captions
    runs_dir: Path = Path("runs")  # run folders written by the trainer
    adapters_dir: Path = Path("adapters")  # uploaded .safetensors adapters and exported blends
    base_model: str = ""  # "" = the tiny built-in model
    presets_dir: Path = REPO_ROOT / "presets"
    # Server folders a browser may import from or train on, besides the data folder and the shipped examples. The
    # page can be reached by anyone who can reach the port: without this list, "Import a folder" copied any server
    # file into datasets/, from where it was served (issue 15).
    import_dirs: tuple[Path, ...] = ()

    def readable_dirs(self) -> tuple[Path, ...]:
        """The folders whose images the page may import or train on."""
        return (self.data_dir, EXAMPLES_DIR, *self.import_dirs)

    @classmethod
    def from_env(cls, **overrides) -> "AppSettings":
        """Defaults, then LORADESK_* environment variables, then explicit overrides (launch flags)."""
        env = {
            "data_dir": os.environ.get("LORADESK_DATA_DIR"),
            "runs_dir": os.environ.get("LORADESK_RUNS_DIR"),
            "adapters_dir": os.environ.get("LORADESK_ADAPTERS_DIR"),
            "base_model": os.environ.get("LORADESK_BASE_MODEL"),
        }
        imports = os.environ.get("LORADESK_IMPORT_DIRS")
        env["import_dirs"] = [p for p in imports.split(os.pathsep) if p.strip()] if imports else None
        values = {k: v for k, v in env.items() if v is not None}
        values.update({k: v for k, v in overrides.items() if v is not None})
        for key in ("data_dir", "runs_dir", "adapters_dir", "presets_dir"):
            if key in values:
                values[key] = Path(values[key]).expanduser()
        if "import_dirs" in values:
            values["import_dirs"] = tuple(Path(p).expanduser() for p in values["import_dirs"])
        return cls(**values)
