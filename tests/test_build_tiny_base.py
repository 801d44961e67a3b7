"""tools/build_tiny_base.py end to end on a tiny budget: it runs from scratch, is seeded (two runs give the same
bytes), and writes a standard diffusers folder with a CLIP-format tokenizer."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_BUDGET = ["--vae-steps", "3", "--cache", "64", "--steps", "4", "--warmup", "2", "--eval-prompts", "2",
               "--threads", "2"]  # the shipped build's thread count


@pytest.fixture(scope="module")
def build():
    spec = importlib.util.spec_from_file_location("build_tiny_base", ROOT / "tools" / "build_tiny_base.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def weight_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.safetensors"))}


def test_build_is_seeded_and_loads_in_plain_diffusers(build, tmp_path):
    assert build.main(["--out", str(tmp_path / "a"), *TINY_BUDGET]) == 0
    assert build.main(["--out", str(tmp_path / "b"), *TINY_BUDGET]) == 0
    a, b = weight_files(tmp_path / "a"), weight_files(tmp_path / "b")
    assert set(a) == {"unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                      "text_encoder/model.safetensors"}
    assert a == b, "the same seed and budget must give the same weights"
    assert build.main(["--out", str(tmp_path / "c"), *TINY_BUDGET, "--seed", "7"]) == 0
    assert weight_files(tmp_path / "c") != a

    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "a"))
    assert pipe.safety_checker is None and pipe.tokenizer.model_max_length == 32
    folder = tmp_path / "a" / "tokenizer"
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    assert len(tok("a red circle on a blue background", add_special_tokens=False).input_ids) == 7  # one per word


def test_varied_captions_keep_the_world_words_and_never_draw_demo_words(build):
    import random
    rng = random.Random(0)
    captions = [build.varied_caption(rng, "blue", "red", "circle") for _ in range(400)]
    assert all("red circle" in c and "blue background" in c for c in captions)
    assert captions.count("a red circle on a blue background") > 100
    words = {w.strip(",") for c in captions for w in c.split()}
    assert not words & build.RESERVED_WORDS
    assert any(len(c.split(",")) > 1 and not c.startswith(("a ", "red ", "blue ")) for c in captions)  # prefixes
