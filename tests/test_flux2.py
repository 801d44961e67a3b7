"""FLUX.2 klein through the family seam: a tiny Flux2KleinPipeline folder (Qwen3 with a synthesized Qwen2 tokenizer,
2 double and 2 single blocks, a VAE with non-trivial batch-norm statistics) renders offline, its text, latents and
predictions equal the pipeline's, it trains through the CLI, and its default (kohya, BFL-named) file loads in
diffusers' Flux2KleinPipeline with every key and the outputs of a hand merge."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tiny import hand_merged, make_images
from trainer.formats import load_adapter
from trainer.models import load_base_model

GROUPS = "network.unet_targets=['attention', 'feed_forward']"


@pytest.fixture(scope="module")
def klein_dir(tmp_path_factory) -> Path:
    from tiny_flux2 import make_tiny_klein
    return make_tiny_klein(tmp_path_factory.mktemp("tiny-klein") / "model")


def train(model: Path, root: Path, *extra: str, steps: int = 8) -> Path:
    from trainer.__main__ import main
    data = make_images(root / "data", n=4, size=48)
    sets = [f"model.path={model}", f"dataset.path={data}", "dataset.resolution=32", "dataset.batch_size=2",
            f"schedule.max_steps={steps}", "schedule.lr_scheduler=constant", "optimizer.unet_lr=3e-3",
            "network.rank=4", "network.alpha=2", f"saving.runs_dir={root / 'runs'}", "run.name=klein",
            "saving.dtype=fp32", "saving.every_n_steps=4", "sampling.every_n_steps=0", "network.text_encoders=[]",
            GROUPS, *extra]
    assert main(["train", "--quiet", *[x for s in sets for x in ("--set", s)]]) == 0
    run_dir, = (root / "runs").iterdir()
    return run_dir


@pytest.fixture(scope="module")
def klein_run(klein_dir, tmp_path_factory):
    return train(klein_dir, tmp_path_factory.mktemp("klein-run"))


def test_the_tiny_klein_folder_renders_offline_through_diffusers(klein_dir, no_network):
    from diffusers import Flux2KleinPipeline
    from transformers import AutoTokenizer
    index = json.loads((klein_dir / "model_index.json").read_text())
    assert index["_class_name"] == "Flux2KleinPipeline" and index["tokenizer"][1].startswith("Qwen2Tokenizer")
    tok = AutoTokenizer.from_pretrained(klein_dir / "tokenizer")
    text = tok.apply_chat_template([{"role": "user", "content": "a red square"}], tokenize=False,
                                   add_generation_prompt=True, enable_thinking=False)
    assert text == "<|im_start|>user\na red square<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    pipe = Flux2KleinPipeline.from_pretrained(klein_dir)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt="a red square", height=32, width=32, num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3) and bool(torch.isfinite(torch.from_numpy(image)).all())
    assert pipe.vae.bn.running_var.min() > 0.2 and pipe.vae.bn.running_mean.abs().max() > 0.1  # statistics kept


@pytest.fixture(scope="module")
def klein(klein_dir):
    from diffusers import Flux2KleinPipeline
    torch.manual_seed(0)
    return load_base_model(str(klein_dir)), Flux2KleinPipeline.from_pretrained(klein_dir)


def test_encode_text_equals_the_pipelines_encode_prompt(klein):
    base, pipe = klein
    captions = ["a red square", "zqx dog on the blue background", ""]
    with torch.no_grad():
        ours = base.encode_text(captions)["encoder_hidden_states"]
        theirs, _ = pipe.encode_prompt(captions, device="cpu")
    assert base.family.name == "flux2" and ours.shape == (3, 512, 48)
    assert torch.equal(ours, theirs)


def test_latents_and_predictions_are_the_pipelines_in_the_vaes_shape(klein):
    """latents(): the pipeline's batch-norm normalisation (its decode undoes it); predict(): the transformer on the
    pipeline's packed tokens and position ids, unpacked as the pipeline does."""
    base, pipe = klein
    g = torch.Generator().manual_seed(0)
    z, text = torch.randn(2, 8, 8, 8, generator=g), torch.randn(2, 12, 48, generator=g)
    latents = base.latents(z)
    mean = pipe.vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(pipe.vae.bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
    assert torch.allclose(pipe._unpatchify_latents(pipe._patchify_latents(latents) * std + mean), z, atol=1e-6)
    assert not torch.allclose(latents, z, atol=1e-2)
    with torch.no_grad():
        ours = base.predict(latents, torch.tensor([500.0, 250.0]), {"encoder_hidden_states": text})
        patches = pipe._patchify_latents(latents)
        ids = pipe._prepare_latent_ids(patches)
        out = pipe.transformer(hidden_states=pipe._pack_latents(patches), timestep=torch.tensor([0.5, 0.25]),
                               guidance=None, encoder_hidden_states=text, txt_ids=pipe._prepare_text_ids(text),
                               img_ids=ids, return_dict=False)[0]
    assert torch.equal(ours, pipe._unpatchify_latents(pipe._unpack_latents_with_ids(out, ids, 4, 4)))


def test_the_default_file_is_bfl_named_with_klein_metadata_and_reads_back(klein_run):
    with safe_open(str(klein_run / "klein.safetensors"), "pt") as f:
        names, meta = {k.split(".")[0] for k in f.keys()}, f.metadata()
    double = {f"lora_unet_double_blocks_{i}_{s}_{m}" for i in range(2) for s in ("img", "txt")
              for m in ("attn_qkv", "attn_proj", "mlp_0", "mlp_2")}
    assert names == double | {f"lora_unet_single_blocks_{i}_linear{k}" for i in range(2) for k in (1, 2)}
    assert meta["modelspec.architecture"] == "flux-2-klein/lora" and meta["ss_base_model_version"] == "flux2_klein"
    back = load_adapter(klein_run / "klein.safetensors")
    assert "lora_unet_transformer_blocks_1_attn_add_k_proj" in back.layers
    assert back.layers["lora_unet_single_transformer_blocks_0_attn_to_qkv_mlp_proj"].rank == 4
    from trainer.models import family_of_adapter
    assert family_of_adapter(back.layers, {}, back.metadata).name == "flux2"
    assert family_of_adapter(back.layers, {}, {}).name == "flux2"  # klein's own module names, no metadata


def transformer_output(transformer) -> torch.Tensor:
    from trainer.models.flux2 import image_ids, text_ids
    g = torch.Generator().manual_seed(0)
    tokens, text = torch.randn(1, 16, 32, generator=g), torch.randn(1, 8, 48, generator=g)
    with torch.no_grad():
        return transformer(hidden_states=tokens, timestep=torch.tensor([0.5]), guidance=None,
                           encoder_hidden_states=text, txt_ids=text_ids(8, "cpu"), img_ids=image_ids(4, 4, "cpu"),
                           return_dict=False)[0]


def test_diffusers_loads_the_file_with_every_key_and_the_hand_merged_output(klein_run, klein_dir, caplog):
    from diffusers import Flux2KleinPipeline
    from diffusers.utils import logging as dlogging
    pipe = Flux2KleinPipeline.from_pretrained(klein_dir)
    plain = transformer_output(pipe.transformer)
    dlogging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            pipe.load_lora_weights(str(klein_run / "klein.safetensors"))
    finally:
        dlogging.disable_propagation()
    assert not [r for r in caplog.records if any(w in r.getMessage() for w in ("nsupported", "unexpected", "missing"))]
    adapter = load_adapter(klein_run / "klein.safetensors")
    loaded = sum(1 for m in pipe.transformer.modules() if hasattr(m, "lora_A") and m.lora_A)
    assert loaded == len(adapter.layers) == 2 * 12 + 2 * 2  # 8 attention + 4 feed-forward per double block
    theirs, ours = transformer_output(pipe.transformer), transformer_output(hand_merged(klein_dir, adapter))
    assert (ours - theirs).abs().max() < 1e-4
    assert (ours - plain).abs().max() > 1e-3, "the LoRA changes the output"


def test_the_diffusers_layout_loads_in_diffusers_too(klein_run, klein_dir, tmp_path):
    from diffusers import Flux2KleinPipeline
    from trainer.__main__ import main
    out = tmp_path / "klein-diffusers.safetensors"
    assert main(["export", str(klein_run), "--format", "diffusers", "--dtype", "fp32", "--out", str(out)]) == 0
    kohya = Flux2KleinPipeline.from_pretrained(klein_dir)
    kohya.load_lora_weights(str(klein_run / "klein.safetensors"))
    plain = Flux2KleinPipeline.from_pretrained(klein_dir)
    plain.load_lora_weights(str(out))
    assert (transformer_output(kohya.transformer) - transformer_output(plain.transformer)).abs().max() < 1e-5


def test_the_loss_falls_on_the_tiny_klein(klein_dir, tmp_path):
    from trainer import runs
    same = make_images(tmp_path / "same", n=4, size=48)  # the training images: a noise-free view of the loss
    run_dir = train(klein_dir, tmp_path, f"validation.path={same}", "dataset.batch_size=4", steps=30)
    fixed = runs.validation_losses(run_dir)
    print(f"tiny klein: flow-matching loss at fixed sigmas and noise, step 0 {fixed[0]:.4f}, step 30 {fixed[30]:.4f}")
    assert fixed[30] < 0.95 * fixed[0]


def test_stop_then_resume_equals_an_uninterrupted_klein_run(klein_dir, tmp_path):
    from test_training import assert_same_tensors, make_cfg, stopped_and_resumed, tensors
    from trainer.events import Progress
    cfg = make_cfg(klein_dir, make_images(tmp_path / "data", n=4, size=48), tmp_path,
                   **{"dataset.resolution": 32, "network.text_encoders": ["te1"], "schedule.max_steps": 6,
                      "dataset.flip": True, "loss.resolution_shift": True})
    full, resumed, events, _, _ = stopped_and_resumed(cfg)
    assert [e.step for e in events if isinstance(e, Progress)] == [4, 5, 6]
    assert_same_tensors(tensors(full), tensors(resumed))


def test_samples_take_a_negative_prompt_and_single_files_are_refused(klein, tmp_path):
    from trainer.models.errors import ModelLoadError
    base, _ = klein
    pipe = base.pipeline()
    kwargs = dict(prompt="a red square", height=32, width=32, num_inference_steps=1, output_type="np")
    plain = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    negative = pipe(**kwargs, negative_prompt="blue", generator=torch.Generator().manual_seed(0)).images
    empty = pipe(**kwargs, negative_prompt="", generator=torch.Generator().manual_seed(0)).images
    assert (abs(plain - empty)).max() == 0 and (abs(plain - negative)).max() > 0
    with pytest.raises(ModelLoadError, match="diffusers folder only"):
        base.family.load_single_file({}, source=tmp_path / "klein.safetensors", config_dir=None, dtype=torch.float32)


def test_real_size_names_come_from_the_shipped_configs():
    from trainer.models.meta import meta_index
    index = meta_index("flux2")
    unet = {n for n, (prefix, _, _) in index.items() if prefix == "lora_unet"}
    assert "lora_unet_single_transformer_blocks_19_attn_to_qkv_mlp_proj" in unet
    assert not any(n.startswith("lora_unet_single_transformer_blocks_20_") for n in unet)
    assert "lora_te1_model_layers_35_self_attn_q_proj" in index


def test_samples_are_the_same_with_the_text_encoder_freed(klein_dir, tmp_path):
    """dataset.free_text_encoders: samples drawn from the encodings (pipeline_text_kwargs, the negative prompt's as
    negative_prompt_embeds) equal those the pipeline encodes itself, bit for bit."""
    sampled = ["sampling.every_n_steps=2", "sampling.steps=2", "sampling.negative_prompt=blue",
               "sampling.prompts=['a red square']"]
    kept = train(klein_dir, tmp_path / "kept", *sampled, steps=2)
    freed = train(klein_dir, tmp_path / "freed", *sampled, "dataset.free_text_encoders=true", steps=2)
    images = [sorted(run.rglob("*.png")) for run in (kept, freed)]
    assert len(images[0]) == len(images[1]) == 1
    assert images[0][0].read_bytes() == images[1][0].read_bytes()


def test_a_flux2_dev_folder_is_refused_by_name(tmp_path):
    from trainer.models.detect import check_folder
    from trainer.models.errors import ModelLoadError
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "Flux2Pipeline",
                                                           "transformer": ["diffusers", "Flux2Transformer2DModel"]}))
    with pytest.raises(ModelLoadError, match="Flux2Pipeline .*FLUX.2 klein"):
        check_folder(tmp_path)


def test_at_real_size_the_files_modules_are_bfls_checkpoint_layout_as_diffusers_and_comfyui_read_it():
    """klein 4B from the shipped config on the meta device. A BFL checkpoint holding the file's modules (the table's
    BFL paths), each as wide as the modules it fuses, converts through diffusers' own reader of BFL's klein files
    (convert_flux2_transformer_checkpoint_to_diffusers, single_file_utils.py:3852-4012) to exactly the transformer's
    attention and feed-forward weights at their shapes: the names and shapes are BFL's. ComfyUI loads BFL's file as
    it is (its keys under diffusion_model.) and takes a LoRA module named lora_unet_ + the key without .weight, "."
    as "_" (comfy/lora.py model_lora_keys_unet, its rule for every diffusion_model key; the ComfyUI stored here
    predates klein, so its klein code is not read): those names are the file's."""
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers
    from trainer.models import get_family, meta_index
    from trainer.models.flux2_layout import KINDS
    family, index = get_family("flux2"), meta_index("flux2")
    layers = {path: layer for prefix, path, layer in index.values() if prefix == "lora_unet"}
    checkpoint = {}
    for bfl_block, block, modules in KINDS:
        count = 1 + max(int(p.split(".")[1]) for p in layers if p.startswith(block + "."))
        for i in range(count):
            for bfl, parts in modules.items():
                fused = [layers[f"{block}.{i}.{part}"] for part in parts]
                rows = sum(layer.out_features for layer in fused)
                checkpoint[f"{bfl_block}.{i}.{bfl}.weight"] = torch.empty(rows, fused[0].in_features, device="meta")
    converted = convert_flux2_transformer_checkpoint_to_diffusers(dict(checkpoint))
    targets = tuple("." + m for g in ("attention", "feed_forward") for m in family.unet_groups[g])
    trained = {path: layer for path, layer in layers.items() if path.endswith(targets)}
    assert {k[:-len(".weight")]: tuple(v.shape) for k, v in converted.items()} == \
        {path: tuple(layer.weight.shape) for path, layer in trained.items()}
    comfyui = {"lora_unet_" + k[:-len(".weight")].replace(".", "_") for k in checkpoint}
    names = {n for n, (prefix, path, _) in index.items() if prefix == "lora_unet" and path in trained}
    assert {f.name for f in family.kohya_file_layout(names)} == comfyui
    assert len(comfyui) == 5 * 8 + 20 * 2  # klein 4B: 5 double blocks x 8 modules, 20 single blocks x 2
