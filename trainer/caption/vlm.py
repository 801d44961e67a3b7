"""Sentence captioners through plain transformers, never trust_remote_code: Florence-2 (the florence-community
checkpoints, Florence2ForConditionalGeneration), BLIP (BlipForConditionalGeneration) and Qwen2.5-VL / Qwen3-VL
(AutoModelForImageTextToText with the processor's chat template)."""
from __future__ import annotations

from pathlib import Path

from .errors import CaptionError, first_line

# Florence-2's caption tasks (transformers' Florence2Processor.task_prompts_without_inputs): one short sentence, a
# detailed one, a paragraph. DETAILED is the default: a paragraph runs past the 75 tokens CLIP text encoders read.
FLORENCE_TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")
QWEN_PROMPT = ("Write a caption for this image as one or two plain sentences for training an image model: the "
               "subject, what it does, the setting, the style. No preamble.")
DEFAULT_PROMPTS = {"florence2": "<DETAILED_CAPTION>", "blip": "", "qwen-vl": QWEN_PROMPT}
MAX_NEW_TOKENS = {"florence2": 128, "blip": 40, "qwen-vl": 160}
NUM_BEAMS = {"florence2": 3, "blip": 1, "qwen-vl": 1}  # Florence-2's model card generates with 3 beams
QWEN_MAX_PIXELS = 1024 * 1024  # larger images are scaled down first: a caption needs no more, memory grows with it


def _model_class(kind: str):
    import transformers
    name = {"florence2": "Florence2ForConditionalGeneration", "blip": "BlipForConditionalGeneration",
            "qwen-vl": "AutoModelForImageTextToText"}[kind]
    cls = getattr(transformers, name, None)
    if cls is None:
        raise CaptionError(f"transformers {transformers.__version__} has no {name}: upgrade it "
                           f"(pip install -U transformers) to caption with this model")
    return cls


def _check_qwen_needs(kind: str) -> None:
    """Qwen-VL's processor in transformers 5 builds a video processor, which needs torchvision (found in testing:
    without it the processor cannot be made); loradesk itself does not depend on torchvision."""
    import importlib.util
    if kind == "qwen-vl" and importlib.util.find_spec("torchvision") is None:
        raise CaptionError("Qwen-VL's processor needs torchvision, which is not installed: pip install the "
                           "torchvision that matches your torch, or caption with Florence-2, BLIP or a WD tagger")


def pick_device(device: str | None = None):
    """(device, dtype): the GPU in bf16 (fp16 where bf16 is missing) when there is one, else the CPU in fp32."""
    import torch
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return "cpu", torch.float32
    return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class TransformersCaptioner:
    """A loaded sentence captioner: `caption(images)` -> one caption per PIL image."""
    mode = "sentence"

    def __init__(self, folder: Path, kind: str, device: str | None = None, max_new_tokens: int | None = None):
        from transformers import AutoProcessor
        self.kind = kind
        self.prompt = DEFAULT_PROMPTS[kind]
        self.max_new_tokens = max_new_tokens or MAX_NEW_TOKENS[kind]
        self.device, self.dtype = pick_device(device)
        cls = _model_class(kind)
        _check_qwen_needs(kind)
        try:
            self.processor = AutoProcessor.from_pretrained(str(folder))
            self.model = cls.from_pretrained(str(folder), dtype=self.dtype).to(self.device).eval()
        except (OSError, ValueError, KeyError) as e:
            raise CaptionError(f"cannot load the caption model in {folder} ({first_line(e)}); download it "
                               f"again") from None
        if kind == "qwen-vl":  # a decoder-only model continues the prompt: pad on the left for batches
            self.processor.tokenizer.padding_side = "left"

    def configure(self, prompt: str | None = None, thresholds: dict | None = None) -> None:
        """Set the prompt of the next captions (None: this kind's default); a loaded model takes a new one."""
        if thresholds:
            raise CaptionError(f"--threshold is for a WD tagger; this model ({self.kind}) writes sentences")
        prompt = DEFAULT_PROMPTS[self.kind] if prompt is None else prompt.strip()
        if self.kind == "florence2" and prompt not in FLORENCE_TASKS:
            raise CaptionError(f"Florence-2's prompt is a caption task, one of {', '.join(FLORENCE_TASKS)}; "
                               f"got {prompt!r}")
        if self.kind == "qwen-vl" and not prompt:
            raise CaptionError("Qwen-VL needs a prompt that asks for a caption; leave --prompt out for the default")
        self.prompt = prompt

    def caption(self, images: list) -> list[str]:
        import torch
        inputs = self._inputs(images).to(self.device)
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with torch.inference_mode():
            ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, num_beams=NUM_BEAMS[self.kind],
                                      do_sample=False)
        if self.kind == "qwen-vl":  # its output repeats the prompt's tokens first
            ids = ids[:, inputs["input_ids"].shape[1]:]
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        return [" ".join(text.split()) for text in texts]

    def _inputs(self, images: list):
        if self.kind == "florence2":
            return self.processor(text=[self.prompt] * len(images), images=images, return_tensors="pt", padding=True)
        if self.kind == "blip":
            text = [self.prompt] * len(images) if self.prompt else None  # a prompt: BLIP continues that text
            return self.processor(images=images, text=text, return_tensors="pt", padding=bool(text))
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt}]}]
        chat = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.processor(text=[chat] * len(images), images=[_at_most(im, QWEN_MAX_PIXELS) for im in images],
                              return_tensors="pt", padding=True)


def _at_most(image, pixels: int):
    """The image scaled down (aspect kept) to at most `pixels` pixels."""
    from PIL import Image
    area = image.width * image.height
    if area <= pixels:
        return image
    scale = (pixels / area) ** 0.5
    return image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))),
                        Image.Resampling.LANCZOS)

