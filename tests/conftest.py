import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Tiny models gain nothing from threads, and oversubscribed OpenMP threads spin: one thread is 6x faster on a
# shared 2-core machine. Set LORADESK_TEST_THREADS to change it.
os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("LORADESK_TEST_THREADS", "1"))
sys.path.insert(0, str(Path(__file__).parent))

import socket  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny SD1.x diffusers folder built from configs (seed 0), shared by the whole session."""
    from tiny import save_tiny_model
    return save_tiny_model(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture
def image_dir(tmp_path) -> Path:
    from tiny import make_images
    return make_images(tmp_path / "data", n=4)


@pytest.fixture
def no_network(monkeypatch):
    """Every connection attempt fails and is recorded; hub offline mode is off, so nothing hides an attempt."""
    from huggingface_hub import constants
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled by the test")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return attempts


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    """A tiny SDXL diffusers folder built from configs (seed 0), shared by the whole session."""
    from tiny import save_tiny_sdxl
    return save_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory) -> Path:
    """A tiny SD 3.5 diffusers folder (dual attention in block 0, qk-norm, a synthesized T5 tokenizer), seed 0."""
    from tiny_sd3 import make_tiny_sd3
    return make_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3") / "model")


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory) -> Path:
    """A tiny FLUX.1-dev diffusers folder (guidance embedding, dynamic shift, a synthesized T5 tokenizer), seed 0."""
    from tiny_flux import make_tiny_flux
    return make_tiny_flux(tmp_path_factory.mktemp("tiny-flux") / "model")
