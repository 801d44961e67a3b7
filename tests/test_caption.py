"""Captioning by a local model (issue 27): a tiny ONNX tagger and tiny Florence-2 / BLIP models built from configs
after a fixed seed, offline. Random weights write gibberish: the tests check structure, files and rules, not words."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from tiny import byte_bpe
from trainer import CaptionError, CaptionOptions, caption_dataset, preview_captions, set_dataset_trigger, with_trigger
from trainer.__main__ import main

# ------------------------------------------------------------------------------------------------------------------
# a tiny WD-style tagger: mean BGR colour -> Gemm -> sigmoid, with scores chosen per tag (see TAGS)

TAGS = [  # (name, category, weights on the mean B, G, R in 0..1, bias): score = sigmoid(w . bgr + bias)
    ("general", "9", (0, 0, 0), 2.0),             # rating: 0.88
    ("explicit", "9", (0, 0, 0), -2.0),           # rating: 0.12
    ("red_background", "0", (0, 0, 10), -5.0),    # 0.993 on a red image, 0.007 on a blue one
    ("simple_background", "0", (0, 0, 0), 4.0),   # 0.982 always
    ("^_^", "0", (0, 0, 0), 3.0),                 # 0.95 always; a kaomoji keeps its underscore
    ("zqx_(artist)", "4", (0, 0, 0), 0.0),        # character: 0.5, under the default 0.85
    ("never_seen", "0", (0, 0, 0), -5.0),         # 0.007
]


def write_tagger(folder: Path, side: int = 16, batch: int | str = "N") -> Path:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    folder.mkdir(parents=True, exist_ok=True)
    weights = np.array([t[2] for t in TAGS], dtype=np.float32).T  # [3, tags]
    bias = np.array([t[3] for t in TAGS], dtype=np.float32)
    nodes = [helper.make_node("ReduceMean", ["input_1"], ["mean"], axes=[1, 2], keepdims=0),
             helper.make_node("Div", ["mean", "k255"], ["bgr"]),
             helper.make_node("Gemm", ["bgr", "w", "b"], ["logits"]),
             helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"])]
    graph = helper.make_graph(
        nodes, "tiny-tagger",
        [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, [batch, side, side, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, [batch, len(TAGS)])],
        [numpy_helper.from_array(weights, "w"), numpy_helper.from_array(bias, "b"),
         numpy_helper.from_array(np.array(255.0, dtype=np.float32), "k255")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, folder / "model.onnx")
    rows = ["tag_id,name,category,count"] + [f"{i},{name},{cat},{100 - i}" for i, (name, cat, _, _) in enumerate(TAGS)]
    (folder / "selected_tags.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def tagger(tmp_path_factory) -> Path:
    return write_tagger(tmp_path_factory.mktemp("tagger"))


def make_dataset(folder: Path) -> Path:
    """red.png, blue.png, old.png (captioned 'kept caption'), broken.png (not an image), 10_sub/deep.png (red)."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 16), (255, 0, 0)).save(folder / "red.png")
    Image.new("RGB", (16, 24), (0, 0, 255)).save(folder / "blue.png")
    Image.new("RGB", (16, 16), (255, 0, 0)).save(folder / "old.png")
    (folder / "old.txt").write_text("kept caption\n", encoding="utf-8")
    (folder / "broken.png").write_bytes(b"not a png at all")
    (folder / "10_sub").mkdir()
    Image.new("RGB", (16, 16), (255, 0, 0)).save(folder / "10_sub" / "deep.png")
    return folder


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main(["caption", *map(str, args), "--quiet"])
    out = capsys.readouterr()
    return code, out.out, out.err


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------------------------------------
# the tagger through the CLI

def test_tags_written_kohya_style_existing_kept_unreadable_named(tmp_path, tagger, capsys):
    data = make_dataset(tmp_path / "data")
    code, out, err = run_cli(capsys, data, "--model", tagger, "--batch-size", 2)
    assert code == 0, err
    # highest score first, underscores as spaces, ^_^ (3 characters) kept; no rating or character by default
    assert (data / "red.txt").read_text(encoding="utf-8") == "red background, simple background, ^_^\n"
    assert (data / "blue.txt").read_text(encoding="utf-8") == "simple background, ^_^\n"
    assert (data / "10_sub" / "deep.txt").read_text(encoding="utf-8") == "red background, simple background, ^_^\n"
    assert (data / "old.txt").read_text(encoding="utf-8") == "kept caption\n"
    assert out.count("broken.png") == 1 and "skipped" in out  # one message, naming the file
    assert not (data / "broken.txt").exists()
    assert "wrote 3 captions, kept 1 existing" in out and "skipped 1" in out
    assert leftovers(data) == []


def test_overwrite_thresholds_prefix_suffix(tmp_path, tagger, capsys):
    data = make_dataset(tmp_path / "data")
    code, out, err = run_cli(capsys, data, "--model", tagger, "--overwrite", "--mode", "tags",
                             "--threshold", "character=0.4", "--threshold", "rating=0.5", "--threshold", "0.96",
                             "--prefix", "zqx style,", "--suffix", "best")
    assert code == 0, err
    # rating first, then characters, then general tags over 0.96 (^_^ at 0.95 drops out)
    assert (data / "old.txt").read_text(encoding="utf-8") == \
        "zqx style, general, zqx (artist), red background, simple background, best\n"
    assert (data / "blue.txt").read_text(encoding="utf-8") == \
        "zqx style, general, zqx (artist), simple background, best\n"
    # the caption --overwrite replaced is kept, once, under the dataset's hidden backup folder (never trained on)
    backups = list((data / ".caption-backup").rglob("*.txt"))
    assert [b.relative_to(b.parents[1]) for b in backups] == [Path(backups[0].parent.name) / "old.txt"]
    assert backups[0].read_text(encoding="utf-8") == "kept caption\n" and "are kept in" in out
    from trainer.data import scan_dataset
    from trainer.config import DatasetSection
    assert not any(".caption-backup" in str(i.path) for i in scan_dataset(DatasetSection(path=str(data))).items)


def test_trigger_rule_is_the_typed_captions_rule(tmp_path, tagger):
    data = make_dataset(tmp_path / "data")
    set_dataset_trigger(data, "zqx")
    report = caption_dataset(data, str(tagger))
    assert report.trigger == "zqx"
    by_name = {r.image.name: r for r in report.written}
    red = by_name["red.png"]
    assert red.trained == with_trigger(red.caption, "zqx") == "zqx, " + red.caption
    # written as a typed caption is: the trigger is put in front at training, not stored
    assert (data / "red.txt").read_text(encoding="utf-8") == red.caption + "\n"
    assert red.file == data / "red.txt"


def test_preview_writes_nothing(tmp_path, tagger):
    data = make_dataset(tmp_path / "data")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in data.rglob("*"))
    results = preview_captions(data, str(tagger), n=2)
    assert [r.image.name for r in results] == ["deep.png", "blue.png"]  # the first two to caption (scan order)
    assert all(r.file is None and r.caption for r in results)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in data.rglob("*")) == before


def test_a_failed_write_leaves_the_old_caption_whole(tmp_path, tagger, monkeypatch):
    """Writes are atomic: a write that fails at its rename leaves the previous caption, never half a file."""
    import trainer.atomic
    data = make_dataset(tmp_path / "data")
    real_replace, calls = os.replace, []

    def failing_replace(src, dst):
        calls.append(dst)
        if Path(dst).name == "old.txt":
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)
    monkeypatch.setattr(trainer.atomic.os, "replace", failing_replace)
    with pytest.raises(OSError):
        caption_dataset(data, str(tagger), CaptionOptions(overwrite=True, batch_size=1))
    assert (data / "old.txt").read_text(encoding="utf-8") == "kept caption\n"
    assert (data / "blue.txt").is_file()  # written before it (scan order: 10_sub/deep, blue, old, red)
    assert leftovers(data) == []


def test_progress_and_messages_for_the_app(tmp_path, tagger):
    data = make_dataset(tmp_path / "data")
    progress, messages = [], []
    caption_dataset(data, str(tagger), CaptionOptions(batch_size=2), progress=lambda d, t: progress.append((d, t)),
                    message=messages.append)
    assert progress == [(2, 3), (3, 3)]
    assert len(messages) == 1 and "broken.png" in messages[0]


def test_fixed_batch_tagger_and_large_images(tmp_path):
    """An export whose batch is fixed at 1 is fed one image at a time; an image larger than its side is shrunk."""
    tagger = write_tagger(tmp_path / "tagger1", side=8, batch=1)
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        Image.new("RGB", (40 + i, 30), (255, 0, 0)).save(data / f"r{i}.png")
    report = caption_dataset(data, str(tagger), CaptionOptions(batch_size=3))
    assert [r.caption for r in report.written] == ["red background, simple background, ^_^"] * 3


class TypingCaptioner:
    """A fake captioner: while it captions its first batch, the user types a caption for `typed` (the Dataset tab
    beside a queued caption job)."""
    kind, mode = "fake", "sentence"

    def __init__(self, typed: Path):
        self.typed, self.calls = typed, 0

    def configure(self, prompt, thresholds) -> None:
        pass

    def caption(self, images) -> list[str]:
        self.calls += 1
        if self.calls == 1:
            self.typed.write_text("typed by hand\n", encoding="utf-8")
        return ["model text"] * len(images)


@pytest.mark.parametrize("batch_size", [1, 4])  # the typed image in a later batch / in the batch being captioned
def test_a_caption_typed_while_captioning_is_kept(tmp_path, batch_size):
    data = make_dataset(tmp_path / "data")  # to caption, in scan order: 10_sub/deep, blue, red (broken skipped)
    messages = []
    report = caption_dataset(data, TypingCaptioner(data / "red.txt"), CaptionOptions(batch_size=batch_size),
                             message=messages.append)
    assert (data / "red.txt").read_text(encoding="utf-8") == "typed by hand\n"
    assert {p.name for p in report.kept} == {"old.png", "red.png"}
    assert {r.image.name for r in report.written} == {"deep.png", "blue.png"}
    assert any("red.png" in m for m in messages)
    # with overwrite the model's caption replaces it, as asked
    report = caption_dataset(data, TypingCaptioner(data / "red.txt"), CaptionOptions(overwrite=True))
    assert (data / "red.txt").read_text(encoding="utf-8") == "model text\n"


def test_missing_dataset_names_the_cli_argument(tmp_path, tagger, capsys):
    code, _, err = run_cli(capsys, tmp_path / "nope", "--model", tagger)
    assert code == 2 and "DATASET" in err and "nope" in err and "dataset.path" not in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    (tmp_path / "a.png").write_bytes(b"x")
    code, _, err = run_cli(capsys, tmp_path / "a.png", "--model", tagger)
    assert code == 2 and "DATASET" in err and "a.png" in err and "dataset.path" not in err
    code, _, err = run_cli(capsys, " ", "--model", tagger)
    assert code == 2 and "DATASET" in err and "dataset.path" not in err


@pytest.mark.parametrize("args, words", [
    (["--mode", "sentence"], "--mode sentence needs"),
    (["--threshold", "general=1.5"], "outside 0..1"),
    (["--threshold", "face=0.5"], "not a tag category"),
    (["--threshold", "x=y"], "is not [CATEGORY=]SCORE"),
    (["--prompt", "<CAPTION>"], "takes no prompt"),
    (["--batch-size", "0"], "--batch-size 0"),
])
def test_bad_options_are_one_line(tmp_path, tagger, capsys, args, words):
    data = make_dataset(tmp_path / "data")
    code, out, err = run_cli(capsys, data, "--model", tagger, *args)
    assert code == 2 and words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (data / "red.txt").exists()


def test_bad_model_folders(tmp_path, capsys):
    data = make_dataset(tmp_path / "data")
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, data, "--model", tmp_path / "empty")
    assert code == 2 and "neither config.json" in err
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "config.json").write_text(json.dumps({"model_type": "clip_text_model"}))
    code, _, err = run_cli(capsys, data, "--model", tmp_path / "sd")
    assert code == 2 and "'clip_text_model'" in err
    (tmp_path / "ms").mkdir()
    (tmp_path / "ms" / "config.json").write_text(json.dumps({"model_type": "florence2", "auto_map": {}}))
    code, _, err = run_cli(capsys, data, "--model", tmp_path / "ms")
    assert code == 2 and "trust_remote_code" in err and "florence-community" in err
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model.onnx").write_bytes(b"x")
    code, _, err = run_cli(capsys, data, "--model", tmp_path / "half")
    assert code == 2 and "selected_tags.csv" in err
    code, _, err = run_cli(capsys, data, "--model", "nobody/no-such-captioner")  # offline in tests
    assert code == 2 and "no-such-captioner" in err and "Traceback" not in err


def test_tag_list_that_does_not_match_the_model(tmp_path, capsys):
    tagger = write_tagger(tmp_path / "tagger")
    rows = (tagger / "selected_tags.csv").read_text().splitlines()
    (tagger / "selected_tags.csv").write_text("\n".join(rows[:-1]) + "\n")
    code, _, err = run_cli(capsys, make_dataset(tmp_path / "data"), "--model", tagger)
    assert code == 2 and "different taggers" in err


# ------------------------------------------------------------------------------------------------------------------
# tiny transformers captioners (random weights), saved with a synthesized tokenizer and processor

def write_tiny_florence2(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import (BartTokenizer, CLIPImageProcessor, Florence2Config, Florence2ForConditionalGeneration,
                              Florence2Processor)
    tok_dir = byte_bpe(folder / "bpe", ["<s>", "<pad>", "</s>", "<unk>"])
    tok = BartTokenizer(vocab=str(tok_dir / "vocab.json"), merges=str(tok_dir / "merges.txt"),
                        extra_special_tokens={"image_token": "<image>"})
    images = CLIPImageProcessor(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32},
                                do_center_crop=False)
    images.image_seq_length = 5  # (32 / 16)^2 patches + 1
    text = dict(model_type="bart", vocab_size=len(tok), max_position_embeddings=256, encoder_layers=1,
                decoder_layers=1, encoder_ffn_dim=16, decoder_ffn_dim=16, encoder_attention_heads=2,
                decoder_attention_heads=2, d_model=16, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, decoder_start_token_id=tok.eos_token_id)
    vision = dict(depths=[1], patch_size=[7], patch_stride=[16], patch_padding=[3], patch_prenorm=[False],
                  embed_dim=[16], num_heads=[2], num_groups=[2], window_size=4, projection_dim=16)
    torch.manual_seed(seed)
    model = Florence2ForConditionalGeneration(Florence2Config(text_config=text, vision_config=vision,
                                                              image_token_id=tok.image_token_id))
    model.save_pretrained(folder)
    Florence2Processor(image_processor=images, tokenizer=tok).save_pretrained(folder)
    return folder


def write_tiny_blip(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor
    folder.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "photo", "of", "red", "blue", "circle",
             "square", "on", "white", "background", "zqx", "##s"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    tok = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]")  # BLIP's decoder starts at [DEC]
    text = dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=64, bos_token_id=tok.bos_token_id, sep_token_id=tok.sep_token_id,
                pad_token_id=tok.pad_token_id, encoder_hidden_size=16)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=16)
    torch.manual_seed(seed)
    BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=16)) \
        .save_pretrained(folder)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok) \
        .save_pretrained(folder)
    (folder / "vocab.txt").unlink()  # the processor saved its own tokenizer files
    return folder


@pytest.fixture(scope="module")
def florence2(tmp_path_factory) -> Path:
    return write_tiny_florence2(tmp_path_factory.mktemp("florence2"))


@pytest.fixture(scope="module")
def blip(tmp_path_factory) -> Path:
    return write_tiny_blip(tmp_path_factory.mktemp("blip"))


def test_florence2_captions_a_folder(tmp_path, florence2, capsys):
    data = make_dataset(tmp_path / "data")
    code, out, err = run_cli(capsys, data, "--model", florence2, "--batch-size", 2, "--device", "cpu",
                             "--prefix", "photo")
    assert code == 0, err
    for name in ("red.txt", "blue.txt", "10_sub/deep.txt"):
        text = (data / name).read_text(encoding="utf-8")
        assert text.startswith("photo, ") and text.endswith("\n") and text.count("\n") == 1  # one line, tidy
        assert len(text) > len("photo, \n")
    assert (data / "old.txt").read_text(encoding="utf-8") == "kept caption\n"
    assert out.count("broken.png") == 1
    assert leftovers(data) == []


def test_florence2_is_deterministic_and_checks_its_task(tmp_path, florence2):
    data = make_dataset(tmp_path / "data")
    first = preview_captions(data, str(florence2), n=3, options=CaptionOptions(device="cpu"))
    again = preview_captions(data, str(florence2), n=3, options=CaptionOptions(device="cpu", batch_size=1))
    assert [r.caption for r in first] == [r.caption for r in again]  # batching changes nothing (greedy/beam)
    with pytest.raises(CaptionError, match="<DETAILED_CAPTION>"):
        preview_captions(data, str(florence2), options=CaptionOptions(prompt="describe it", device="cpu"))
    with pytest.raises(CaptionError, match="--mode tags needs a WD tagger"):
        preview_captions(data, str(florence2), options=CaptionOptions(mode="tags", device="cpu"))


def test_blip_preview_and_trigger(tmp_path, blip):
    from trainer import load_captioner
    data = make_dataset(tmp_path / "data")
    set_dataset_trigger(data, "sks")
    captioner = load_captioner(str(blip), CaptionOptions(device="cpu"))  # loaded once, as the app does
    assert captioner.kind == "blip" and captioner.mode == "sentence"
    results = preview_captions(data, captioner, n=2)
    assert len(results) == 2 and all(r.caption and r.trained == with_trigger(r.caption, "sks") for r in results)
    assert not (data / "red.txt").exists()
    report = caption_dataset(data, captioner, CaptionOptions(prompt="a photo of"))
    assert {r.image.name for r in report.written} == {"red.png", "blue.png", "deep.png"}
    assert all((r.image.with_suffix(".txt")).read_text(encoding="utf-8").startswith("a photo of")
               for r in report.written)


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("torchvision") is not None,
                    reason="torchvision is installed: Qwen-VL's processor can be made")
def test_qwen_vl_without_torchvision_is_one_line(tmp_path, capsys):
    (tmp_path / "qwen").mkdir()
    (tmp_path / "qwen" / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    code, _, err = run_cli(capsys, make_dataset(tmp_path / "data"), "--model", tmp_path / "qwen", "--device", "cpu")
    assert code == 2 and "torchvision" in err and "Traceback" not in err
