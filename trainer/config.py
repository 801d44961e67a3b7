"""The one config tree. The CLI flags, the UI form and the TOML presets are all derived from these dataclasses.

Stdlib only, so the UI and the CLI can import it without loading torch.
Each field carries its help text (and choices, bounds, whether it is a basic field) in `dataclasses.field` metadata.
"""
from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from .errors import UserError
from .paths import expand_path

SCHEMA_VERSION = 2  # 2: network.text_encoders (a list: SDXL has two) replaced network.text_encoder (a bool)


class ConfigError(UserError, ValueError):
    """A config that cannot be used; `problems` lists every reason in plain words."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        super().__init__(f"config problems{where}:\n" + "\n".join(f"  - {p}" for p in self.problems))


def opt(default, help: str, *, choices=None, min=None, max=None, basic=False, label=None):
    """A config field: its default plus the help text and bounds that the CLI, the form and validate() read."""
    meta = {"help": help, "choices": choices, "min": min, "max": max, "basic": basic, "label": label}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


# the LoRA target groups every family's diffusers models share (trainer.models.family owns the module lists; these
# are the names the config accepts, for validate() and the help text)
UNET_GROUP_NAMES = ("attention", "feed_forward", "projections", "adaln", "conv")
TEXT_ENCODER_GROUP_NAMES = ("attention", "mlp")


def _families() -> tuple[list[str], tuple[str, ...]]:
    """The model families (trainer/models owns them; detect.py lists them without importing torch) and their text
    encoders by kohya prefix without "lora_": te for SD 1.x/2.x, te1 and te2 for SDXL."""
    from .models.detect import FAMILIES, all_families
    encoders = (s.prefix.removeprefix("lora_") for f in all_families() for s in f.text_encoder_specs)
    return list(FAMILIES), tuple(sorted(set(encoders)))


FAMILY_NAMES, TEXT_ENCODER_NAMES = _families()
LR_SCHEDULERS = ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]


# every seed's bound: what numpy's seeding takes, kohya's and A1111's range, and exact in the browser's numbers
# (torch.manual_seed overflows past 2**64; a float in the page rounds past 2**53)
MAX_SEED = 2 ** 32 - 1


@dataclass
class RunSection:
    name: str = opt("lora", "Name of the run and of the exported adapter file (letters, digits, - and _).", basic=True)
    seed: int = opt(42, "Seed for every random choice; the run's config.toml (this seed and precision.cpu_threads "
                        "with it) gives the same adapter again on the same CPU.", min=0, max=MAX_SEED)


@dataclass
class ModelSection:
    path: str = opt("", "Base model: a diffusers folder, a single .safetensors checkpoint, or a hub id (needs "
                        "network). Empty means the tiny built-in model.", basic=True, label="Base model")
    family: str = opt("auto", "Model family: 'auto' reads it from the model; sd1, sd2 or sdxl force it (a model whose "
                              "structure says otherwise is refused, naming both).",
                      choices=["auto", *sorted(FAMILY_NAMES)])
    trust_pickle: bool = opt(False, "Allow .ckpt/.pt pickle checkpoints (loaded with weights_only=True). Only for "
                                    "files you trust; prefer .safetensors.")
    # SD3 / FLUX single files as ComfyUI users keep them: the transformer in model.path, the rest beside it
    clip_l_path: str = opt("", "SD3 and FLUX: a separate CLIP-L text encoder file (clip_l.safetensors) for a "
                               "model.path checkpoint that holds none; empty = the one inside model.path.",
                           label="CLIP-L file")
    clip_g_path: str = opt("", "SD3 only: a separate CLIP-G text encoder file (clip_g.safetensors); empty = the one "
                               "inside model.path.", label="CLIP-G file")
    t5_path: str = opt("", "SD3 and FLUX: a separate T5-XXL text encoder file (t5xxl_fp16 or fp8 .safetensors); "
                           "empty = the one inside model.path, or none (SD3, see t5_length).", label="T5-XXL file")
    vae_path: str = opt("", "SD3 and FLUX: a separate VAE file (FLUX's ae.safetensors; diffusers or original "
                            "layout); empty = the one inside model.path.", label="VAE file")
    train_guidance: float = opt(1.0, "FLUX.1 dev only: the guidance value its guidance embedding is given while "
                                     "training. sd-scripts trains dev LoRAs at 1.0 (a LoRA trained at the 3.5 "
                                     "people sample with learns to need it); samples use sampling.guidance.",
                                min=0.0, max=30.0, label="FLUX training guidance")
    t5_length: int = opt(256, "SD3 and FLUX: T5 tokens per caption (sd-scripts' default 256; FLUX.1 dev was trained "
                              "with 512). SD3 only: 0 leaves T5 out, its part of the conditioning zeros, as SD3 "
                              "allows, which saves about 9 GB (fp16) at some cost to prompt following.", min=0,
                         max=512, label="T5 tokens")


@dataclass
class DatasetSection:
    path: str = opt("", "Folder of images with same-name .txt or .caption files. Subfolders named like 10_name "
                        "repeat their images 10 times per epoch.", basic=True, label="Dataset folder")
    regularization_path: str = opt("", "Folder of regularization images (kohya's reg_data_dir, DreamBooth's prior "
                                       "preservation): pictures of the same kind of subject drawn by the base model, "
                                       "captioned without the trigger. Each epoch trains as many of them as training "
                                       "images, which keeps prompts without the trigger drawing what they drew "
                                       "before. Empty = none.", label="Regularization folder")
    trigger: str = opt("", "Trigger word put in front of every caption that does not already hold it (and used "
                          "alone for images without one).", basic=True)
    resolution: int = opt(512, "Training resolution in pixels (the shorter side for buckets).", min=32, max=4096,
                          basic=True)
    batch_size: int = opt(1, "Images per step. Lower it first if you run out of memory.", min=1, max=256,
                          basic=True)
    repeats: int = opt(1, "Repeats per epoch for training images in folders without an N_ prefix (regularization images "
                           "there repeat once).", min=1)
    crop: str = opt("center", "How images are cropped to the bucket size.", choices=["center", "random"])
    bucketing: bool = opt(True, "Aspect-ratio buckets: each batch holds images of one shape, none squashed.")
    bucket_step: int = opt(64, "Bucket sides are multiples of this many pixels.", min=8)
    flip: bool = opt(False, "Random horizontal flip (off for subjects that are not symmetric, such as text).")
    caption_dropout: float = opt(0.0, "Share of steps trained with an empty caption (helps guidance).", min=0.0,
                                 max=1.0)
    shuffle_tags: bool = opt(False, "Shuffle comma-separated tags in each caption.")
    keep_tokens: int = opt(1, "Tags at the start of a caption kept in place when shuffling (the trigger).", min=0)
    cache_latents: str = opt("memory", "Cache VAE latents when no random augmentation needs fresh pixels.",
                             choices=["off", "memory", "disk"])
    cache_text: bool = opt(True, "Cache text-encoder outputs when the text encoder is not trained.")
    free_text_encoders: bool = opt(False, "Encode every caption, sample prompt and the negative prompt once at the "
                                          "start, then delete the text encoders: frees their memory for the whole "
                                          "run (T5-XXL alone is 9.5 GB in bf16, what decides whether SD 3.5 or FLUX "
                                          "fit 12-16 GB). Costs the start-up encoding, and sampling.prompts cannot "
                                          "change during the run. Needs cache_text on, no text encoder trained and "
                                          "shuffle_tags off (shuffled captions are new each step).")
    cache_dir: str = opt("", "Folder of the disk latent cache (cache_latents = disk); empty = .loradesk-cache inside "
                             "the dataset folder. Entries are keyed by image content, so datasets can share one.")


@dataclass
class NetworkSection:
    rank: int = opt(8, "LoRA rank r: the size of the low-rank update. 4 to 32 is typical.", min=1, max=1024,
                    basic=True)
    # the floor: the LoRA's gradients scale with alpha/rank too, and far below it AdamW's eps (1e-8) swamps them.
    # Measured on the tiny model (rank 4, 10 steps, lr 1e-3): the adapter moved per unit of alpha/rank 0.66x as
    # much at 1e-3 as at 1, 0.05x at 1e-6, 6e-4x at 1e-8, and 1e-30 trained an adapter that did nothing. 0.01 keeps
    # the default rank 8 at 1.25e-3; the common presets use 1 to rank.
    alpha: float = opt(8.0, "LoRA alpha: the update is scaled by alpha/rank. alpha = rank means scale 1; a lower "
                            "alpha needs a higher learning rate. At least 0.01: far below that the optimizer no "
                            "longer moves the adapter.", min=0.01, basic=True)
    dropout: float = opt(0.0, "Dropout on the LoRA input during training (each image's mask from its own seed).",
                         min=0.0, max=1.0)
    unet_targets: list = opt(["attention"], "Denoiser (UNet or transformer) modules to adapt: groups 'attention' "
                                            "(UNet: to_q, to_k, to_v, to_out.0; SD3: both streams' q/k/v/out, and "
                                            "attn2 where present), 'feed_forward' (ff.net.0.proj, ff.net.2; SD3 "
                                            "also ff_context), 'projections' (UNet: proj_in, proj_out), 'adaln' "
                                            "(SD3: the adaLN modulation; diffusers notes training it can hurt "
                                            "anatomy), 'conv' (UNet: the convolutions, LoCon's; network.type "
                                            "locon adds it), or module names.")
    text_encoders: list = opt(["all"], "Text encoders that also get a LoRA: 'all' (every one the base model has), "
                                       "or by kohya prefix: te (SD 1.x and 2.x), te1 (SDXL's CLIP ViT-L, SD3's "
                                       "CLIP-L), te2 (SDXL's OpenCLIP bigG, SD3's CLIP-G), te3 (SD3's T5, never in "
                                       "'all'). Empty = the UNet only.", basic=True,
                              label="Text encoders to train")
    text_encoder_targets: list = opt(["attention"], "Text-encoder modules: groups 'attention' (CLIP: q/k/v/out_proj; "
                                                    "T5: q, k, v, o), 'mlp' (CLIP: fc1, fc2; T5: wi_0, wi_1, wo), "
                                                    "or module names.")
    init: str = opt("gaussian", "Initialisation of A (B starts at zero, so step 0 is the base model).",
                    choices=["gaussian", "kaiming"])
    # LyCORIS (issue 26): peft trains each type; the defaults below are what users of kohya/LyCORIS report
    type: str = opt("lora", "Network type. lora: B A (Hu et al. 2021). locon: LoRA plus the UNet's convolutions "
                            "(the 'conv' target group, added for you) at conv_rank/conv_alpha; about 1.5-2x the "
                            "parameters of the same-rank LoRA. loha: (B1 A1) o (B2 A2), rank up to r^2 for twice "
                            "LoRA's parameters; rank <= 32 (16/8 typical), each step computes the full delta (slower "
                            "and more memory than LoRA). lokr: W1 kron W2 with network.factor; very few parameters "
                            "(factor -1) and a small file; users often raise the learning rate. SD 1.x/2.x/SDXL in "
                            "the kohya layout: every type loads in A1111 1.5+, ComfyUI and Forge; diffusers loads "
                            "lora/locon only (saving.format = diffusers refuses loha/lokr). SD 3.5 and FLUX files "
                            "fuse modules: lora only there.",
                    choices=["lora", "locon", "loha", "lokr"], basic=True, label="Network type")
    dora: bool = opt(False, "DoRA (Liu et al. 2024): W' = m (W + dW) / ||W + dW||, a trained magnitude m per "
                            "output row (or input column, dora_axis) over the update of any type (users ask for "
                            "it on LoRA and LoKr); often better at the same rank, slower per step (each adapted "
                            "weight's norm is rebuilt every forward pass). SD 1.x/2.x/SDXL in the kohya layout only: "
                            "neither saving.format = diffusers nor SD 3.5's or FLUX's fused files hold it.",
                     label="DoRA")
    dora_axis: str = opt("out", "The axis of DoRA's magnitude: out (per output row: peft's and LyCORIS's default; "
                                "ComfyUI/Forge since mid-2025 apply it with the base weight's norm, A1111 not as "
                                "trained) or in (per input column, OneTrainer's: the only axis A1111's built-in Lora "
                                "applies, and ComfyUI/Forge apply it as trained too, but LyCORIS 4.1.3's own loader "
                                "cannot read it). Pick 'in' for files shared with A1111/ComfyUI/Forge users; same "
                                "cost either way.",
                         choices=["out", "in"], label="DoRA axis")
    conv_rank: int = opt(0, "Rank of the k x k convolutions (the 'conv' group: resnets' conv1/conv2, down- and "
                            "upsamplers, conv_in/conv_out; LoCon, and LoHa/LoKr when 'conv' is a target); 1x1 "
                            "convolutions use network.rank as kohya does. 0 = network.rank. LoCon: <= 64; a 3x3 "
                            "conv's down factor holds 9x the parameters of a linear one's per unit of rank.",
                         min=0, max=1024)
    conv_alpha: float = opt(0.0, "Alpha of the k x k convolutions (scale conv_alpha/conv_rank); 0 = network.alpha. "
                                 "1 to conv_rank/2 is what LoCon users pick.", min=0.0)
    factor: int = opt(-1, "LoKr: split each dimension n into f x n/f with f as close to factor as divides n; -1 = as "
                          "square as possible (fewest parameters), ~8 keeps more of W2's detail (more parameters).",
                      min=-1, max=1024)
    decompose_both: bool = opt(False, "LoKr: make W1 low-rank too (rank network.rank) where that is smaller; fewer "
                                      "parameters, less capacity.")
    tucker: bool = opt(False, "LoHa/LoKr: Tucker form (a rank x rank x k x k core) for k x k convolutions, "
                              "LyCORIS's use_tucker; fewer parameters for 3x3 convs. Not for lora/locon.")


@dataclass
class OptimizerSection:
    name: str = opt("adamw", "Optimizer. adamw8bit needs CUDA and bitsandbytes; prodigy needs the prodigy extra.",
                    choices=["adamw", "adamw8bit", "adafactor", "prodigy"], basic=True)
    unet_lr: float = opt(1e-4, "Learning rate of the UNet LoRA (use 1.0 with prodigy).", min=0.0, basic=True,
                         label="UNet learning rate")
    text_encoder_lr: float = opt(5e-5, "Learning rate of each text encoder's LoRA (unless text_encoder_lrs sets "
                                       "it).", min=0.0, basic=True, label="Text encoder learning rate")
    text_encoder_lrs: list = opt([], "Learning rates per text encoder as prefix=rate, for example te1=5e-5 and "
                                     "te2=2e-5 (kohya's SDXL trainer has both); others use text_encoder_lr. A rate "
                                     "of 0 keeps that encoder frozen.", label="Per-encoder learning rates")
    weight_decay: float = opt(0.01, "Decoupled weight decay.", min=0.0)
    beta1: float = opt(0.9, "Adam beta1.", min=0.0, max=1.0)
    beta2: float = opt(0.999, "Adam beta2.", min=0.0, max=1.0)
    eps: float = opt(1e-8, "Adam epsilon.", min=0.0)
    max_grad_norm: float = opt(1.0, "Clip the gradient norm to this (0 = off).", min=0.0)


@dataclass
class ScheduleSection:
    max_steps: int = opt(1000, "Optimizer steps to train (ignored when epochs > 0).", min=1, max=10_000_000,
                         basic=True)
    epochs: int = opt(0, "Train this many passes over the dataset instead of max_steps (0 = use max_steps).", min=0,
                      basic=True)
    lr_scheduler: str = opt("constant_with_warmup", "Learning-rate schedule.", choices=LR_SCHEDULERS)
    warmup_steps: int = opt(0, "Steps of linear warmup at the start.", min=0)
    gradient_accumulation: int = opt(1, "Batches accumulated per optimizer step (a larger effective batch).",
                                     min=1)


@dataclass
class LossSection:
    prediction: str = opt("auto", "What the UNet predicts; 'auto' reads the scheduler config.",
                          choices=["auto", "epsilon", "v_prediction"])
    noise_offset: float = opt(0.0, "Noise offset (helps very dark or bright images); 0.05 to 0.1 is typical.",
                              min=0.0, max=1.0)
    min_snr_gamma: float = opt(0.0, "Min-SNR loss weighting gamma (Hang et al. 2023); 5 is typical, 0 = off.",
                               min=0.0)
    high_noise_weight_cap: float = opt(0.0, "Weight each step's noise loss by min(1/alpha_bar_t, cap), the weighting "
                                       "a v-prediction loss gives: more weight on the noisy steps where shape and "
                                       "layout are decided. 0 = off; 50 is what the built-in tiny model was trained "
                                       "with. Not together with min_snr_gamma.", min=0.0)
    prior_loss_weight: float = opt(1.0, "Loss weight of the regularization images against the training images "
                                        "(kohya's prior_loss_weight; DreamBooth uses 1).", min=0.0)
    # rectified flow (SD3/FLUX): read by trainer.models.noise.FlowNoise; the DDPM families ignore them
    timestep_sampling: str = opt("logit_normal", "Flow-matching models only (SD3, FLUX): how each image's noise "
                                 "level is drawn. logit_normal (the SD3 paper's default) favours the middle levels; "
                                 "uniform weighs all alike; mode is a heavier middle shaped by mode_scale.",
                                 choices=["logit_normal", "uniform", "mode"])
    logit_mean: float = opt(0.0, "Flow-matching models only: the mean of logit(sigma) for logit_normal sampling, "
                                 "sigma being the noise level (the SD3 paper's convention); above 0 trains more at "
                                 "high noise (composition), below 0 at low noise (detail). diffusers' and "
                                 "sd-scripts' scripts read the sign the other way round.", min=-5.0, max=5.0)
    logit_std: float = opt(1.0, "Flow-matching models only: the spread of logit(sigma) for logit_normal sampling; "
                                "1.0 is the SD3 paper's.", min=0.01, max=10.0)
    mode_scale: float = opt(1.29, "Flow-matching models only: how strongly mode sampling favours the middle noise "
                                  "levels (1.29, the SD3 paper's; 0 = uniform; the paper's bounds -1 to 1.75 keep it a "
                                  "valid mapping).", min=-1.0, max=1.75)
    flow_shift: float = opt(1.0, "Flow-matching models only: shifts the drawn noise levels towards noise, "
                                 "shift*s / (1 + (shift-1)*s); 1.0 = no shift, sd-scripts' default for LoRA training "
                                 "(diffusers' script trains at the scheduler's 3.0 for SD3, which is also SD3's "
                                 "inference shift; 3.0 here trains more at high noise).", min=0.01, max=100.0)
    resolution_shift: bool = opt(False, "FLUX only: shift each image's noise levels by its size as FluxPipeline's "
                                        "scheduler does at inference (larger images train at more noise); replaces "
                                        "flow_shift. sd-scripts calls this flux_shift.")
    flow_weighting: str = opt("none", "Flow-matching models only: per-image loss weight by noise level. none (the "
                                      "usual with logit_normal); sigma_sqrt or cosmap (the SD3 paper's, as diffusers "
                                      "names them).", choices=["none", "sigma_sqrt", "cosmap"])


@dataclass
class PrecisionSection:
    mixed: str = opt("no", "Mixed precision: fp16 needs CUDA; bf16 works on recent GPUs and on the CPU.",
                     choices=["no", "fp16", "bf16"], basic=True, label="Mixed precision")
    device: str = opt("auto", "Where to train.", choices=["auto", "cpu", "cuda"])
    gradient_checkpointing: bool = opt(False, "Recompute activations in the backward pass: much less memory, "
                                              "about 20% slower.")
    fp8_base: bool = opt(False, "Store the frozen denoiser's weights in fp8 (float8_e4m3fn) and cast each layer to the "
                                "training precision while it runs (diffusers' layerwise casting): half the memory of "
                                "bf16 weights (SD 3.5 Large's transformer: 16 GB -> 8 GB), a little slower, with a "
                                "small loss of precision in the frozen weights. LoRA weights stay fp32.",
                         label="fp8 base weights")
    offload_blocks: int = opt(0, "SD 3.5 and FLUX: keep the frozen weights of the transformer's last N blocks in CPU "
                                 "memory and bring each block's to the card just before it runs, the next one's "
                                 "while this one computes. The last are FLUX.1's 38 single-stream blocks, 0.28 GB each "
                                 "in bf16 (0.14 in fp8), then its 19 double-stream ones, 0.68 GB. Saves that much "
                                 "card memory; costs the copies over PCIe each step (slower the more blocks, and "
                                 "much slower on a slow bus) and pinned CPU memory as large. Needs "
                                 "gradient_checkpointing. 0 = off. (sd-scripts' --blocks_to_swap N counts a "
                                 "double-stream block as two: its 16 is about 35 here.)", min=0, max=1000)
    cpu_threads: int = opt(0, "Threads of a one-process CPU run (0 = the cores other programs leave free when the "
                              "run starts, or OMP_NUM_THREADS). Recorded and kept on resume: the count changes the "
                              "last bits of sums, and a busy machine with a thread per core runs 10-50x slower.",
                           min=0, max=1024)


@dataclass
class SamplingSection:
    every_n_steps: int = opt(250, "Render sample images every N steps (0 = off); the Generate tab starts from the "
                                  "same steps, guidance and seed, so a prompt there draws what a sample showed.",
                             min=0, basic=True)
    prompts: list = opt([], "Sample prompts; empty means the trigger word alone.", basic=True, label="Sample prompts")
    negative_prompt: str = opt("", "Negative prompt for samples.")
    seed: int = opt(1234, "Seed of the first sample prompt; each next prompt uses seed + 1.", min=0, max=MAX_SEED)
    steps: int = opt(20, "Denoising steps per sample.", min=1, max=200)
    guidance: float = opt(7.5, "Guidance scale for samples: classifier-free guidance (SD 1.x to 3.5, FLUX.2 klein's "
                               "base model), or FLUX.1 dev's embedded guidance value (3.5 typical; schnell: 0).",
                          min=0.0)


@dataclass
class ValidationSection:
    split: float = opt(0.0, "Share of the training images held out for a validation loss (round(split x images), at "
                            "least 1, drawn by run.seed); 0 = off. Regularization images are never held out.",
                       min=0.0, max=0.9)
    path: str = opt("", "A folder of validation images (instead of validation.split).")
    every_n_steps: int = opt(0, "Validation loss every N steps, besides at each checkpoint and the end (0 = only "
                                "there).", min=0)
    timesteps: int = opt(4, "Fixed timesteps the validation loss is taken at, evenly spaced (4: 200, 400, 600, 800).",
                         min=1, max=50)
    patience: int = opt(0, "Stop after this many validations without a lower loss (0 = never stop early).", min=0)


@dataclass
class LoggingSection:
    tensorboard: bool = opt(False, "Also write losses, learning rate, validation and samples to RUN_DIR/tensorboard "
                                   "(needs the tensorboard extra: pip install 'loradesk[tensorboard]').")


@dataclass
class SavingSection:
    runs_dir: str = opt("runs", "Folder that holds the run folders.")
    every_n_steps: int = opt(0, "Write a resumable checkpoint every N steps (0 = only at the end).", min=0)
    keep_last: int = opt(3, "Checkpoints kept; older ones are deleted.", min=1)
    format: str = opt("auto", "Layout of the final adapter: auto = the one the most programs load for the base "
                              "model (kohya for SD 1.x/2.x/SDXL: A1111, ComfyUI, Forge, diffusers; diffusers for "
                              "SD3: diffusers, ComfyUI, A1111, and an SD3 run also writes <name>-kohya.safetensors "
                              "for Forge), or kohya, or diffusers/peft.", choices=["auto", "kohya", "diffusers"])
    dtype: str = opt("fp16", "Precision of the final adapter file.", choices=["fp16", "fp32", "bf16"])


@dataclass
class DistributedSection:
    processes: int = opt(1, "Training processes on this machine (data parallel through accelerate/torchrun: one per "
                            "GPU; on the CPU they share the cores over gloo). The global batch is batch_size x "
                            "processes x machines x gradient_accumulation.", min=1, max=64)
    gpus: str = opt("", "Which GPUs, by index (e.g. 0,2); empty = the first `processes` ones.")
    machines: int = opt(1, "Machines training together (each runs the same command with its machine_rank).",
                        min=1, max=1024)
    machine_rank: int = opt(0, "This machine's rank among distributed.machines (0 = the main one).", min=0)
    main_address: str = opt("127.0.0.1", "Address of the main machine (machine_rank 0), reachable from the others.")
    main_port: int = opt(29500, "A free TCP port on the main machine for the processes to meet at.", min=1,
                         max=65535)
    timeout_minutes: int = opt(30, "How long a process waits for the others before the run fails. Process 0 alone "
                                   "validates, renders samples and writes checkpoints while the others wait: raise "
                                   "it when those take longer (a large validation set, many samples).", min=1,
                               max=1440)


@dataclass
class NotifySection:
    webhook_url: str = opt("", "When a queued job ends (python -m trainer queue run), POST a small JSON {run, state, "
                               "adapter, best_val_loss} to this http:// or https:// URL (a chat or home-automation "
                               "webhook); empty = none. A post that fails is a warning line; the queue goes on.")
    desktop: bool = opt(False, "When a queued job ends, show a desktop notification (notify-send on Linux, osascript "
                               "on macOS, PowerShell on Windows); skipped where the system has none.")


@dataclass
class TrainConfig:
    schema_version: int = SCHEMA_VERSION
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    dataset: DatasetSection = field(default_factory=DatasetSection)
    network: NetworkSection = field(default_factory=NetworkSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    loss: LossSection = field(default_factory=LossSection)
    precision: PrecisionSection = field(default_factory=PrecisionSection)
    sampling: SamplingSection = field(default_factory=SamplingSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    saving: SavingSection = field(default_factory=SavingSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    notify: NotifySection = field(default_factory=NotifySection)


SECTIONS = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "schema_version"]


@dataclass(frozen=True)
class FieldInfo:
    """One leaf of the tree as the CLI and the form see it."""
    key: str  # "section.name"
    section: str
    name: str
    type: type
    default: Any
    help: str
    choices: list | None
    min: float | None
    max: float | None
    basic: bool
    label: str


def fields() -> list[FieldInfo]:
    """Every settable field, in declaration order."""
    out = []
    for section in SECTIONS:
        cls = type(getattr(TrainConfig(), section))
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            m = f.metadata
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            label = m.get("label") or f.name.replace("_", " ").capitalize()
            out.append(FieldInfo(f"{section}.{f.name}", section, f.name, hints[f.name], default, m["help"],
                                 m.get("choices"), m.get("min"), m.get("max"), bool(m.get("basic")), label))
    return out


def field_info(key: str) -> FieldInfo:
    for info in fields():
        if info.key == key:
            return info
    raise KeyError(key)


# ----------------------------------------------------------------------------------------------------------------
# values: coercion from TOML, CLI strings and form widgets

def coerce(info: FieldInfo, value: Any) -> Any:
    """Convert a value to the field's type or raise ValueError with a plain reason."""
    t = info.type
    if t is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            return value.strip().lower() in ("true", "1", "yes", "on")
        raise ValueError(f"expected true or false, got {value!r}")
    if t in (int, float):
        return _number(value, t)
    if t is list:
        if isinstance(value, str):
            return [v.strip() for v in value.split("\n" if "\n" in value else ",") if v.strip()] if value else []
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ValueError(f"expected a list of strings, got {value!r}")
    if t is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"expected text, got {value!r}")
    raise TypeError(f"unsupported field type {t}")


def _number(value: Any, kind: type) -> int | float:
    """int or float from a number or its text; a bool or a fractional int is refused."""
    word = "a whole number" if kind is int else "a number"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if kind is float or isinstance(value, int) or value.is_integer():
            return kind(value)
    if isinstance(value, str):
        try:
            return kind(value.strip())
        except ValueError:
            pass
    raise ValueError(f"expected {word}, got {value!r}")


def parse_cli_value(text: str, kind: type | None = None) -> Any:
    """`--set key=value`: read value as TOML (numbers, true/false, lists), else as plain text. A text field
    takes the text as written (distributed.gpus=1, run.name=nan), unquoted when it is a TOML string."""
    if kind is str and text[:1] not in ("'", '"'):
        return text
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def set_value(cfg: TrainConfig, key: str, value: Any) -> None:
    """Set `section.name` on cfg, coercing the value; KeyError for an unknown key, ValueError for a bad value."""
    info = field_info(key)
    setattr(getattr(cfg, info.section), info.name, coerce(info, value))


def get_value(cfg: TrainConfig, key: str) -> Any:
    section, name = key.split(".", 1)
    return getattr(getattr(cfg, section), name)


def apply_overrides(cfg: TrainConfig, overrides: list[str], source: str = "--set") -> TrainConfig:
    """Apply `section.key=value` strings; every bad one is reported at once."""
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"{source} {item!r}: expected section.key=value, for example network.rank=16")
            continue
        key, text = item.split("=", 1)
        key = key.strip()
        try:
            set_value(cfg, key, parse_cli_value(text.strip(), field_info(key).type))
        except KeyError:
            problems.append(f"{source}: unknown key '{key}'{_suggest(key)}")
        except ValueError as e:
            problems.append(f"{source} {key}: {e}")
    if problems:
        raise ConfigError(problems)
    return cfg


def _suggest(key: str) -> str:
    import difflib
    close = difflib.get_close_matches(key, [f.key for f in fields()], n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


# ----------------------------------------------------------------------------------------------------------------
# TOML: sparse presets applied over the defaults

def from_dict(data: dict, source: str = "config", base: TrainConfig | None = None) -> TrainConfig:
    """Apply a nested dict (a parsed TOML file) over `base` (default: the defaults). Unknown keys are errors."""
    cfg = base if base is not None else TrainConfig()
    problems = []
    version = data.get("schema_version", 1)  # a file without the line is read as the oldest schema, then migrated
    if not isinstance(version, int) or version > SCHEMA_VERSION or version < 1:
        problems.append(f"schema_version {version!r} is not supported (this loradesk reads 1 to {SCHEMA_VERSION}); "
                        f"update loradesk or remove the line")
    elif version < SCHEMA_VERSION:
        data = migrate(data, version)
    for section, values in data.items():
        if section == "schema_version":
            continue
        if section not in SECTIONS:
            problems.append(f"unknown section [{section}]{_suggest(section + '.')}: remove it or fix its name "
                            f"(sections: {', '.join(SECTIONS)})")
            continue
        if not isinstance(values, dict):
            problems.append(f"'{section}' must be a [{section}] table")
            continue
        for name, value in values.items():
            key = f"{section}.{name}"
            try:
                set_value(cfg, key, value)
            except KeyError:
                problems.append(f"unknown key '{key}'{_suggest(key)}: remove it or fix its name")
            except ValueError as e:
                problems.append(f"{key}: {e}")
    if problems:
        raise ConfigError(problems, source)
    return cfg


def migrate(data: dict, version: int) -> dict:
    """A parsed config of an older schema in the current one (OneTrainer-style versioned configs: a preset or run
    folder written by an older loradesk still loads, with the same meaning)."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    network = data.get("network")
    if version < 2 and isinstance(network, dict) and "text_encoder" in network:
        on = network.pop("text_encoder")
        if "text_encoders" not in network:  # 1: one switch for the one text encoder SD 1.x has
            network["text_encoders"] = ["all"] if on in (True, "true", 1) else []
    data["schema_version"] = SCHEMA_VERSION
    return data


def load(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a (sparse) TOML config or preset over the defaults, then apply `--set` overrides."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError([f"config file {path} is a folder; give the path of a .toml file in it (or, to continue "
                           f"a run, `python -m trainer train --resume {path}`)"], str(path))
    if not path.is_file():
        raise ConfigError([f"config file {path} does not exist; give the path of a .toml file "
                           f"(`python -m trainer presets` lists the shipped ones)"], str(path))
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError([f"{path} is not valid TOML: {e}"], str(path)) from None
    cfg = from_dict(data, str(path))
    return apply_overrides(cfg, overrides or [])


def find_folders_under(cfg: TrainConfig, root: str | Path) -> TrainConfig:
    """Shipped presets name their folders relative to the project (``examples/demo-concept``); one that is not
    found from the working directory is taken under `root` when it is there, so a preset runs from anywhere."""
    for key in ("dataset.path", "dataset.regularization_path"):
        folder = get_value(cfg, key)
        if not folder.strip() or expand_path(folder).is_absolute() or Path(folder).exists():
            continue
        beside = Path(root).resolve() / folder
        if beside.exists():
            set_value(cfg, key, str(beside))
    return cfg


def to_dict(cfg: TrainConfig, sparse: bool = False) -> dict:
    """Nested dict of the config; `sparse` keeps only values that differ from the defaults (for presets)."""
    defaults = TrainConfig()
    out: dict = {"schema_version": SCHEMA_VERSION}
    for section in SECTIONS:
        values = dataclasses.asdict(getattr(cfg, section))
        if sparse:
            base = dataclasses.asdict(getattr(defaults, section))
            values = {k: v for k, v in values.items() if v != base[k]}
        if values or not sparse:
            out[section] = values
    return out


def dumps(cfg: TrainConfig, sparse: bool = False) -> str:
    """TOML text of the config (a tiny writer: our values are only str, int, float, bool and lists of str)."""
    data = to_dict(cfg, sparse)
    lines = [f"schema_version = {data.pop('schema_version')}"]
    for section, values in data.items():
        lines.append(f"\n[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))
    if isinstance(v, str):
        import json
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} to TOML")


# ----------------------------------------------------------------------------------------------------------------
# validation: every problem at once, in plain words

def validate(cfg: TrainConfig, check_paths: bool = True) -> list[str]:
    """Return every problem with cfg (empty list = usable). Checks types, choices, bounds and cross-field rules."""
    problems = []
    for info in fields():
        value = get_value(cfg, info.key)
        try:
            value = coerce(info, value)
        except ValueError as e:
            problems.append(f"{info.key}: {e}")
            continue
        if info.choices and value not in info.choices:
            problems.append(f"{info.key} is {value!r}; choose one of: {', '.join(map(str, info.choices))}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, float) and not math.isfinite(value):
                problems.append(f"{info.key} must be a finite number, got {value}")
            elif info.min is not None and value < info.min:
                problems.append(f"{info.key} is {value}; it must be at least {info.min}")
            elif info.max is not None and value > info.max:
                problems.append(f"{info.key} is {value}; it must be at most {info.max}")
    problems += _cross_field_problems(cfg, check_paths)
    return problems


def _cross_field_problems(cfg: TrainConfig, check_paths: bool) -> list[str]:
    problems = _distributed_problems(cfg.distributed)
    if cfg.precision.offload_blocks and not cfg.precision.gradient_checkpointing:  # see models/offload.py
        problems.append("precision.offload_blocks needs precision.gradient_checkpointing = true (without it every "
                        "block's weights stay on the card for the backward pass)")
    if cfg.precision.offload_blocks and world_size(cfg) > 1:
        problems.append("precision.offload_blocks trains in one process only; set distributed.processes=1 and "
                        "distributed.machines=1, or set offload_blocks to 0")
    if cfg.precision.fp8_base and world_size(cfg) > 1:  # DDP's start-up broadcast of fp8 weights is untested
        problems.append("precision.fp8_base trains in one process only; set distributed.processes=1 and "
                        "distributed.machines=1, or turn fp8_base off")
    import re
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", cfg.run.name or ""):
        problems.append(f"run.name {cfg.run.name!r} must start with a letter or digit and hold only letters, "
                        f"digits, '-', '_' and '.' (it names the run folder and the adapter file)")
    if cfg.network.alpha > 0 and cfg.network.rank > 0 and cfg.network.alpha / cfg.network.rank > 16:
        problems.append(f"network.alpha/rank = {cfg.network.alpha / cfg.network.rank:g} scales the update by more "
                        f"than 16x, which usually diverges; lower network.alpha")
    problems += _network_problems(cfg)
    problems += _free_text_encoder_problems(cfg)
    if cfg.notify.webhook_url and not re.match(r"https?://[^/\s]+", cfg.notify.webhook_url):
        problems.append(f"notify.webhook_url {cfg.notify.webhook_url!r} is no http:// or https:// URL; give the "
                        f"webhook's full address, or leave it empty")
    if cfg.optimizer.name == "prodigy" and cfg.optimizer.unet_lr < 0.1:
        problems.append(f"optimizer.unet_lr is {cfg.optimizer.unet_lr:g} with prodigy, which sets its own step "
                        f"size; use 1.0")
    if cfg.loss.min_snr_gamma and cfg.loss.high_noise_weight_cap:
        problems.append("loss.min_snr_gamma and loss.high_noise_weight_cap are both set; they are two loss "
                        "weightings, choose one (set the other to 0)")
    if 0 < cfg.loss.high_noise_weight_cap < 1:
        problems.append(f"loss.high_noise_weight_cap is {cfg.loss.high_noise_weight_cap:g}; 1/alpha_bar is at least "
                        f"1, so a cap below 1 only scales the loss down: use 0 (off) or a value such as 50")
    if cfg.dataset.resolution % 8:
        problems.append(f"dataset.resolution {cfg.dataset.resolution} must be a multiple of 8 (the VAE's factor)")
    if cfg.schedule.warmup_steps and cfg.schedule.epochs == 0 and cfg.schedule.warmup_steps >= cfg.schedule.max_steps:
        problems.append(f"schedule.warmup_steps ({cfg.schedule.warmup_steps}) must be below schedule.max_steps "
                        f"({cfg.schedule.max_steps})")
    if check_paths:
        problems += _home_problems(cfg)
        if not cfg.dataset.path:
            problems.append("dataset.path is empty: give the folder that holds your training images")
        elif not expand_path(cfg.dataset.path).is_dir():
            problems.append(f"dataset.path {cfg.dataset.path} is not a folder; give the folder that holds your "
                            f"training images")
        problems += _regularization_problems(cfg.dataset)
        problems += _validation_problems(cfg.validation)
        mp = cfg.model.path
        if mp and _looks_local(mp) and not expand_path(mp).exists():
            problems.append(f"model.path {mp} does not exist; give a diffusers folder or a .safetensors file "
                            f"(empty = the built-in tiny model)")
        if mp and Path(mp).suffix.lower() in (".ckpt", ".pt", ".pth", ".bin") and not cfg.model.trust_pickle:
            problems.append(f"model.path {mp} is a pickle checkpoint, which can run code when loaded; convert it to "
                            f".safetensors, or set model.trust_pickle=true if you trust the file")
        problems += _component_file_problems(cfg.model)
    return problems


def _component_file_problems(model: ModelSection) -> list[str]:
    problems = []
    for key in ("clip_l_path", "clip_g_path", "t5_path", "vae_path"):
        value = getattr(model, key)
        if value.strip() and not expand_path(value).is_file():
            problems.append(f"model.{key} {value} is not a file; give the .safetensors file, or leave it empty to "
                            f"use the one inside model.path")
        elif value.strip() and expand_path(value).suffix.lower() != ".safetensors":
            problems.append(f"model.{key} {value}: only .safetensors component files are read; convert it")
    return problems


PATH_KEYS = ("model.path", "model.clip_l_path", "model.clip_g_path", "model.t5_path", "model.vae_path",
             "dataset.path", "dataset.regularization_path", "validation.path", "saving.runs_dir")


def sample_prompts(cfg: TrainConfig, trigger: str | None) -> list[str]:
    """The prompts samples are rendered with: sampling.prompts, else the dataset's trigger alone."""
    return list(cfg.sampling.prompts or [trigger or "a photo"])


def gpu_list(text: str) -> list[int]:
    """'0, 2' -> [0, 2] (distributed.gpus); a ValueError for anything else."""
    return [int(part) for part in text.replace(" ", "").split(",") if part]


def _distributed_problems(d: DistributedSection) -> list[str]:
    problems = []
    if d.machine_rank >= d.machines:
        problems.append(f"distributed.machine_rank is {d.machine_rank}, but there are {d.machines} machines: ranks "
                        f"go from 0 to {d.machines - 1}")
    try:
        gpus = gpu_list(d.gpus)
    except ValueError:
        return problems + [f"distributed.gpus {d.gpus!r} must be GPU numbers separated by commas, e.g. 0,1"]
    if gpus and len(gpus) != d.processes:
        problems.append(f"distributed.gpus names {len(gpus)} GPUs for {d.processes} processes; name one per "
                        f"process, or leave it empty for the first {d.processes}")
    if len(set(gpus)) != len(gpus):
        problems.append(f"distributed.gpus {d.gpus!r} names a GPU twice")
    if any(i < 0 for i in gpus):
        problems.append(f"distributed.gpus {d.gpus!r}: GPUs are numbered from 0")
    return problems


def _validation_problems(val: ValidationSection) -> list[str]:
    if val.path.strip() and val.split:
        return ["validation.path and validation.split are both set; use one (the folder, or a share of the "
                "dataset held out)"]
    if val.path.strip() and not expand_path(val.path).is_dir():
        return [f"validation.path {val.path} is not a folder; give a folder of validation images"]
    return []


def _home_problems(cfg: TrainConfig) -> list[str]:
    problems = []
    for key in PATH_KEYS:
        value = get_value(cfg, key)
        if value.startswith("~") and expand_path(value) == Path(value):
            user = value[1:].split("/", 1)[0]
            problems.append(f"{key} {value}: there is no user {user!r} on this machine whose home folder ~{user} "
                            f"could stand for; give the full path")
    return problems


def _network_problems(cfg: TrainConfig) -> list[str]:
    import re
    net, problems = cfg.network, []
    for key, names, groups in (("unet_targets", net.unet_targets, UNET_GROUP_NAMES),
                               ("text_encoder_targets", net.text_encoder_targets, TEXT_ENCODER_GROUP_NAMES)):
        problems += [f"network.{key}: {name!r} is not a group ({', '.join(groups)}) or a module name"
                     for name in names if not re.fullmatch(r"[A-Za-z0-9_.]+", name)]
    problems += [f"network.text_encoders: {name!r} is not a text encoder; use all, or te (SD 1.x/2.x), te1 and "
                 f"te2 (SDXL), te1, te2 and te3 (SD3)" for name in net.text_encoders if name not in ("all", *TEXT_ENCODER_NAMES)]
    lrs, lr_problems = parse_text_encoder_lrs(cfg.optimizer.text_encoder_lrs)
    problems += lr_problems
    te_trains = trains_text_encoders(cfg)
    if net.text_encoders and not net.text_encoder_targets:
        problems.append("network.text_encoders names text encoders but network.text_encoder_targets is empty")
    if not net.unet_targets and not te_trains:
        problems.append("network.unet_targets is empty and no text encoder is trained: nothing would be trained")
    if cfg.optimizer.unet_lr == 0 and not te_trains:
        problems.append("optimizer.unet_lr is 0 and no text encoder is trained: nothing would change")
    return problems + _lycoris_problems(net, cfg.saving.format)


def makes_lycoris_layers(net: NetworkSection) -> bool:
    """Whether the adapter holds layers only LyCORIS-aware readers take (LoHa, LoKr, a DoRA magnitude): not plain
    up @ down, so neither the diffusers layout nor a family whose files fuse modules can hold them (formats/write.py
    _lycoris_file). lora and locon without DoRA are plain LoRA layers."""
    return net.type in ("loha", "lokr") or net.dora


def _lycoris_problems(net: NetworkSection, saving_format: str = "auto") -> list[str]:
    """What cannot be trained among network.type / dora / factor / tucker, one line each (trainer.network); the
    family's own refusals (its files fuse modules) are network.unet_target_names', at setup."""
    lycoris = net.type in ("loha", "lokr")
    problems = []
    if saving_format == "diffusers" and makes_lycoris_layers(net):  # refused before training, not at export
        what = "network.dora" if net.type in ("lora", "locon") else f"network.type = {net.type}"
        problems.append(f"saving.format = diffusers cannot hold {what} (diffusers reads neither LoHa/LoKr nor "
                        f"DoRA's dora_scale); set saving.format = kohya (or auto)")
    if lycoris and net.dropout > 0:  # peft's LoHa/LoKr have rank/module dropout only, drawn per process
        problems.append(f"network.dropout is {net.dropout:g}, but {net.type} has no input dropout; set it to 0")
    if net.factor == 0:
        problems.append("network.factor 0 is no factor; use -1 (as square as possible) or a number >= 1")
    if net.tucker and not lycoris:  # peft's LoRA has no Tucker core (LyCORIS's lora_mid)
        problems.append(f"network.tucker is for loha and lokr; network.type {net.type} trains without it")
    if net.decompose_both and net.type != "lokr":
        problems.append(f"network.decompose_both is for lokr; network.type is {net.type}")
    return problems


def _free_text_encoder_problems(cfg: TrainConfig) -> list[str]:
    """dataset.free_text_encoders deletes the encoders after encoding every caption once: that needs captions
    that are known at the start and encoders that nothing needs again."""
    ds = cfg.dataset
    if not ds.free_text_encoders:
        return []
    why = []
    if not ds.cache_text:
        why.append("dataset.cache_text is off")
    if trains_text_encoders(cfg):
        why.append("a text encoder trains (network.text_encoders)")
    if ds.shuffle_tags:
        why.append("dataset.shuffle_tags makes a new caption each step")
    return [f"dataset.free_text_encoders needs every caption encoded once at the start, but {' and '.join(why)}; "
            f"turn free_text_encoders off or change that"] if why else []


def parse_text_encoder_lrs(entries: list[str]) -> tuple[dict[str, float], list[str]]:
    """optimizer.text_encoder_lrs ("te1=5e-5") as {"te1": 5e-5}, and the problems of the entries that are not."""
    out, problems = {}, []
    for entry in entries:
        name, sep, value = entry.partition("=")
        try:
            rate = float(value) if sep else -1.0
        except ValueError:
            rate = -1.0
        if name.strip() not in TEXT_ENCODER_NAMES or not (rate >= 0 and math.isfinite(rate)):
            problems.append(f"optimizer.text_encoder_lrs: {entry!r} is not prefix=rate with a prefix among "
                            f"{', '.join(TEXT_ENCODER_NAMES)} and a rate of at least 0, for example te1=5e-5")
            continue
        out[name.strip()] = rate
    return out, problems


def text_encoder_lr(cfg: TrainConfig, name: str) -> float:
    """The learning rate of one text encoder (kohya prefix without lora_: te, te1, te2)."""
    return parse_text_encoder_lrs(cfg.optimizer.text_encoder_lrs)[0].get(name, cfg.optimizer.text_encoder_lr)


def world_size(cfg: TrainConfig) -> int:
    """Data-parallel processes of a run: processes per machine x machines."""
    return cfg.distributed.processes * cfg.distributed.machines


MODEL_OPTIONS = ("clip_l_path", "clip_g_path", "t5_path", "vae_path", "t5_length", "train_guidance")


def model_options(cfg: TrainConfig) -> dict:
    """The model section's family options, as load_base_model takes them (paths expanded; empty ones left out)."""
    out = {}
    for key in MODEL_OPTIONS:
        value = getattr(cfg.model, key)
        if isinstance(value, str):
            if value.strip():
                out[key] = str(expand_path(value))
        else:
            out[key] = value
    return out


def global_batch(cfg: TrainConfig) -> int:
    """Images per optimizer step: batch_size x processes x machines x gradient_accumulation (the one rule: the
    loop's batch plan, the metadata and the app's note all ask it)."""
    return cfg.dataset.batch_size * world_size(cfg) * cfg.schedule.gradient_accumulation


def trains_text_encoders(cfg: TrainConfig) -> bool:
    """Whether any text encoder could get a LoRA that learns (its name listed, a rate above 0)."""
    names = cfg.network.text_encoders
    if not names or not cfg.network.text_encoder_targets:
        return False
    listed = TEXT_ENCODER_NAMES if "all" in names else [n for n in names if n in TEXT_ENCODER_NAMES]
    return any(text_encoder_lr(cfg, name) > 0 for name in listed)


def _regularization_problems(ds: DatasetSection) -> list[str]:
    reg = ds.regularization_path.strip()
    if not reg:
        return []
    if not expand_path(reg).is_dir():
        return [f"dataset.regularization_path {reg} is not a folder; give the folder of regularization images, or "
                f"leave it empty"]
    if ds.path and expand_path(reg).resolve() == expand_path(ds.path).resolve():
        return [f"dataset.regularization_path is the training folder {ds.path}; regularization images need a folder "
                f"of their own, captioned without the trigger"]
    return []


def _looks_local(path: str) -> bool:
    """A hub id is 'owner/name'; a checkpoint suffix, ./, ~, / or a backslash marks a local path."""
    import re
    if Path(path).suffix.lower() in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
        return True
    return not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", path) or expand_path(path).exists()


def expand_targets(names: list[str], groups: dict[str, list[str]]) -> list[str]:
    """Group names expanded to their module names (a family's groups), other names kept; no duplicates."""
    out = []
    for name in names:
        for module in groups.get(name, [name]):
            if module not in out:
                out.append(module)
    return out


def check(cfg: TrainConfig, check_paths: bool = True, source: str | None = None) -> TrainConfig:
    """validate() and raise ConfigError with every problem."""
    problems = validate(cfg, check_paths)
    if problems:
        raise ConfigError(problems, source)
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# what a network reads (network.py injects it; the app's form shows these fields)

def requested_unet_targets(net) -> list[str]:
    """network.unet_targets, plus the 'conv' group that network.type = locon adds (family-free: the metadata's
    view; unet_target_names checks the family has the group)."""
    names = list(net.unet_targets)
    if net.type == "locon" and "conv" not in names:
        names.append("conv")
    return names


def trains_convolutions(net) -> bool:
    """Whether the UNet targets (with LoCon's) take a module of the 'conv' group: the group, or one of its module
    names. The config's view, family-free (a target the family lacks fails injection)."""
    from .models.family import UNET_GROUPS  # (torch-free)
    return bool(set(expand_targets(requested_unet_targets(net), UNET_GROUPS)) & set(UNET_GROUPS["conv"]))


# the network.* fields every network reads; the others belong to a type, DoRA or convolutions (network_fields_in_use)
_ALWAYS_READ = {"type", "rank", "alpha", "dora", "unet_targets", "text_encoders", "text_encoder_targets"}


def network_fields_always_read() -> set[str]:
    """The network.* keys every network reads, whatever its type (the rest: network_fields_in_use)."""
    return {f"network.{key}" for key in _ALWAYS_READ}


def network_fields_in_use(net) -> set[str]:
    """The network.* keys this network reads (what the app's form shows): input dropout and the init of A for
    lora/locon (peft's LoHa/LoKr have neither), tucker for LoHa/LoKr, factor and decompose_both for LoKr,
    conv_rank/conv_alpha where convolutions train (network._conv_patterns), dora_axis with DoRA. Torch-free: the
    app asks it while its page is built."""
    used = set(_ALWAYS_READ)
    used |= {"dropout", "init"} if net.type in ("lora", "locon") else {"tucker"}
    used |= {"factor", "decompose_both"} if net.type == "lokr" else set()
    used |= {"conv_rank", "conv_alpha"} if trains_convolutions(net) else set()
    used |= {"dora_axis"} if net.dora else set()
    return {f"network.{key}" for key in used}
