"""The typed config: every default lives here, once.

A YAML file holds only what differs from these defaults. Dotted overrides (`--data.dataset_name custom`,
`--set training.batch_size=8`) are applied on top, then the whole tree is validated and *every* problem is
reported at once, each with its dotted key. This module imports no torch, so `ditpipe --help` stays fast.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import reprlib
import stat
import unicodedata
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ditpipe.pipeline import safe_yaml
from ditpipe.pipeline.errors import ConfigError
from ditpipe.pipeline.samplers import NAMES as SAMPLER_NAMES, SAMPLERS

# The widest power-function EMA profile (γ = 0: the plain running mean); a wider one would weigh old weights more.
POSTHOC_MAX_SIGMA_REL = 12 ** -0.5


class _Section(BaseModel):
    # Unknown keys are errors (with a suggestion), never silently ignored. No float key takes .inf or .nan (an
    # infinite LR, decay, clipping norm or guidance scale passes every `gt`/`ge` bound and ruins a run), and no int
    # key takes a bool (pydantic would read YAML's `true` as 1).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, v, info):
        if isinstance(v, bool) and _takes_int(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"expects a whole number, got {str(v).lower()}")
        return v


def _takes_int(annotation) -> bool:
    """An int key (or Optional[int]): where a bool is a mistake, not a value."""
    return annotation is int or (get_origin(annotation) is Union and int in get_args(annotation)
                                 and bool not in get_args(annotation))


# Bounds on the sizes a config, a shard manifest or a checkpoint may ask for, checked before anything is allocated:
# an altered file could otherwise demand any amount of memory (a latent of 30000 x 30000 asks 7.2 GB for pos_embed
# alone). They are generous: DiT-XL/2 at 512 px has 1,024 tokens, width 1152, depth 28, 16 heads and 675 M
# parameters. pipeline/model.py checks every model against them; manifest.check_latent_shape every manifest.
MAX_IMAGE_SIZE = 4096  # data.image_size, and a manifest's latent side
MAX_TOKENS = 16_384  # a 128 x 128 patch grid: 2048 px at f8 / patch 2, or 256 px pixel-space at patch 2
MAX_HIDDEN = 8_192
MAX_DEPTH = 256
MAX_HEADS = 256
MAX_PATCH = 64
MAX_CHANNELS = 1_024  # latent channels (DC-AE's deepest has 128)
MAX_CLASSES = 1_000_000
MAX_TEXT_DIM = 16_384  # the caption encoder's width (T5-XXL: 4096)
MAX_PARAMETERS = 8_000_000_000  # about 32 GB in fp32
MAX_GRID = 256  # validation.num_samples: a 16 x 16 grid, sampled at every validation
# Seeds: training.seed also seeds numpy's legacy global RNG, which takes 0 .. 2**32 - 1; data.seed is hashed into
# 64-bit keys (pipeline/order.py), so a larger one would alias a smaller one.
MAX_TRAINING_SEED = 2**32 - 1
MAX_DATA_SEED = 2**64 - 1


class DataConfig(_Section):
    dataset_name: Literal["coco", "custom", "shapes"] = Field(
        "coco", description="coco, custom (your folder) or shapes (built in, generated, no download)")
    dataset_path: str = Field("./data", description="raw images: the COCO root or the custom folder (unused for shapes)")
    split: Literal["train", "val"] = Field("train", description="COCO split: train (train2017) or val (val2017)")
    image_size: int = Field(256, ge=8, le=MAX_IMAGE_SIZE, description="pixels; a multiple of the codec's downsample factor")
    num_samples: Optional[int] = Field(5000, ge=1, description="deterministic subset of the inputs; null takes all")
    seed: int = Field(0, ge=0, le=MAX_DATA_SEED, description="picks the subset and generates shapes (separate from "
                                                            "training.seed)")
    captions: bool = Field(False, description="embed every caption once with text.encoder (the `text` extra)")
    source: Literal["shards", "images"] = Field(
        "shards", description="shards (precomputed latents) or images (online VAE every step: the baseline)")
    num_workers: int = Field(4, ge=0, le=256, description="loader and decoder worker processes (capped at the CPUs)")
    shuffle_window: int = Field(8, ge=1, description="shards shuffled together each epoch: locality against mixing")
    # The budget an input must fit, checked before decoding (file size, then the header's width × height): larger
    # inputs are skipped with the reason. 40 MP covers 8K UHD and 6000×6000 photos; PIL's own bomb guard stays on.
    max_pixels: int = Field(40_000_000, ge=1, description="inputs with more pixels (by their header) are skipped "
                                                          "before decoding")
    max_file_bytes: int = Field(256 << 20, ge=1, description="inputs larger than this file size are skipped before "
                                                             "decoding")
    download: bool = Field(False, description="COCO only: fetch the official archives first (encode)")
    download_url: str = Field("https://images.cocodataset.org", description="the COCO mirror to download from; "
                                                                            "archives must match the pinned sha256")
    # scale: the codec's scaling/shift factors (DiT); channel: the manifest's per-channel mean/std (LightningDiT, EDM2)
    latent_norm: Literal["scale", "channel"] = Field(
        "scale", description="scale (codec scaling/shift factors, as DiT) or channel (manifest per-channel mean/std)")
    val_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="fraction held out (keyed on data.seed), never "
                                                                 "trained on, for the validation loss")
    buckets: Union[Literal["square", "auto"], list[tuple[int, int]]] = Field(
        "square", description="square (centre crop, as DiT), auto (about image_size² pixels, 1:2 to 2:1) or a "
                              "list of [w, h]: each image to the nearest aspect ratio (pipeline/buckets.py)")

    @field_validator("buckets")
    @classmethod
    def _bucket_sizes(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("an empty bucket list; use square, auto or a list of [w, h] sizes")
            bad = [f"{w}x{h}" for w, h in v if not (8 <= w <= MAX_IMAGE_SIZE and 8 <= h <= MAX_IMAGE_SIZE)]
            if bad:
                raise ValueError(f"bucket side(s) outside 8..{MAX_IMAGE_SIZE} pixels: {', '.join(bad)}")
        return v


class ShardsConfig(_Section):
    path: Optional[str] = Field(None, description="shard folder; null: shards/<dataset>-<split>-<size>px-<codec>-"
                                                  "<num_samples or all>")
    format: Literal["wds", "parquet"] = Field("wds", description="wds (WebDataset tar) or parquet")
    samples_per_shard: int = Field(1000, ge=1, description="inputs per shard file")
    store: Literal["mean_std", "mean"] = Field("mean_std", description="mean_std (fresh posterior draws in training)"
                                                                       " or mean (4x smaller)")
    flip: bool = Field(True, description="random horizontal flips in training (VAE codecs also encode the mirror); "
                                         "off for glyphs, text, logos, maps")


class TextConfig(_Section):
    encoder: str = Field("minilm", description="caption encoder: minilm (offline), clip, t5, a hub id or a local "
                                               "folder")
    max_tokens: int = Field(77, ge=1, le=77, description="tokens per caption; longer captions are truncated")
    batch_size: int = Field(256, ge=1, description="captions per text-encoder call (encode)")


class TargetsConfig(_Section):
    encoder: Optional[str] = Field(None, description="representation targets stored with the latents (REPA/REG): "
                                                     "dinov2 (facebook/dinov2-base), inception (offline, the eval "
                                                     "extra's), a transformers hub id or local folder; null: none")
    class_token: bool = Field(False, description="also store the encoder's class token, first (REG)")
    dtype: Literal["fp16", "int8"] = Field("fp16", description="fp16, or int8 (a symmetric scale per token: half "
                                                               "the bytes)")
    batch_size: int = Field(64, ge=1, description="images per target-encoder call (encode)")


class StorageConfig(_Section):
    endpoint_url: Optional[str] = Field(None, description="s3:// locations: an S3-compatible endpoint (MinIO, a local "
                                                          "server); null: AWS_ENDPOINT_URL or AWS. Credentials come "
                                                          "only from the environment, never the config")
    cache_dir: str = Field("~/.cache/ditpipe", description="node-local cache of remote shards (and the staging of "
                                                           "remote encodes and runs); one per node")
    cache_limit_gb: float = Field(50.0, gt=0.0, description="remote shards kept in cache_dir at most; the least "
                                                            "recently used are evicted first")
    prefetch_shards: int = Field(4, ge=0, le=1024, description="remote shards fetched ahead of the loader, in the "
                                                               "order it will read them; 0 fetches on first need")
    retries: int = Field(5, ge=0, le=100, description="a lost connection or a 5xx is retried this many times, with "
                                                      "exponential back-off from 0.5 s")


class VaeConfig(_Section):
    name: str = Field("stabilityai/sd-vae-ft-ema", description="a diffusers autoencoder's id or local folder (its "
                                                               "class from its config.json), or pixel (no VAE)")
    dtype: Literal["fp32", "bf16"] = Field("fp32", description="fp32 or bf16; never fp16 (SD VAEs overflow to NaN)")
    use_slicing: bool = Field(False, description="encode one image at a time (less memory)")
    batch_size: int = Field(32, ge=1, description="encode batch; halved on out-of-memory")
    # cuDNN's timed choice of kernels may differ between processes: the same command then writes the same bytes only
    # up to the last bit of some latents.
    cudnn_benchmark: bool = Field(True, description="CUDA: cuDNN times its convolution kernels per shape (faster); "
                                                    "false: byte-identical encodes across processes")


class ModelConfig(_Section):
    name: str = Field("DiT-B/2", description="preset (DiT-S/B/L/XL × patch 2/4/8; DiT-T-* for captions)")
    hidden_size: Optional[int] = Field(None, ge=1, le=MAX_HIDDEN, description="overrides the preset's width")
    depth: Optional[int] = Field(None, ge=1, le=MAX_DEPTH, description="overrides the preset's number of blocks")
    num_heads: Optional[int] = Field(None, ge=1, le=MAX_HEADS, description="overrides the preset's attention heads")
    patch_size: Optional[int] = Field(None, ge=1, le=MAX_PATCH, description="overrides the preset's patch size")
    conditioning: Literal["auto", "class", "none", "caption"] = Field(
        "auto", description="auto (from the manifest: captions, else labels, else none), class, none or caption")
    init_from: Optional[str] = Field(None, description="fine-tune from these weights (official .pt, our checkpoint or"
                                                       " run, .safetensors); a new run; ignored on resume")
    init_weights: Literal["ema", "raw"] = Field("ema", description="which weights of one of our checkpoints "
                                                                   "init_from takes")
    learn_sigma: bool = Field(True, description="DiT's learned variance (ddpm only)")
    class_dropout_prob: float = Field(0.1, ge=0.0, lt=1.0, description="label or caption dropout per sample, what "
                                                                       "guidance needs")
    qk_norm: bool = Field(False, description="normalise queries and keys (fp16 stability)")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward: less memory, slower")
    compile: bool = Field(False, description="torch.compile the model")

    @property
    def patch(self) -> int:
        """The patch size this config builds with: patch_size, else the preset's (`DiT-B/2` → 2)."""
        tail = self.name.rsplit("/", 1)[-1]
        return self.patch_size or (int(tail) if tail.isdigit() else 2)


class DiffusionConfig(_Section):
    objective: Literal["ddpm", "flow"] = Field("ddpm", description="ddpm (DiT's ε-prediction) or flow (rectified "
                                                                   "flow)")
    timestep_mean: float = Field(0.0, ge=-3.0, le=3.0, description="flow: training times t = sigmoid(n), n ~ "
                                                                    "N(timestep_mean, timestep_std²) (SD3's "
                                                                    "logit-normal); > 0 favours high noise")
    timestep_std: float = Field(1.0, gt=0.0, le=3.0, description="flow: the logit-normal's spread; narrower "
                                                                 "trains mid-noise harder (the quickstart: 0.6)")


REPA_WEIGHT = 0.5  # the paper's λ (proj_coeff): what encode's `next:` line proposes after --targets


class RepaConfig(_Section):
    weight: float = Field(0.0, ge=0.0, description="REPA: the alignment loss's weight (the paper's 0.5); 0 turns it "
                                                   "off; needs shards encoded with --targets")
    depth: int = Field(8, ge=1, le=MAX_DEPTH, description="the DiT block (1-based) whose output is aligned (REPA: 8 "
                                                          "of 28)")
    projector_dim: int = Field(2048, ge=1, le=MAX_HIDDEN, description="the projector's width: a 3-layer SiLU MLP, "
                                                                      "as official")


class TrainingConfig(_Section):
    seed: int = Field(0, ge=0, le=MAX_TRAINING_SEED, description="model init, data order, flips, noise and "
                                                                "timesteps")
    batch_size: int = Field(4, ge=1, description="per process, per micro-batch")
    gradient_accumulation_steps: int = Field(4, ge=1, description="micro-batches per optimizer step")
    num_epochs: int = Field(50, ge=1, description="epochs; the LR schedule spans them all")
    max_steps: Optional[int] = Field(None, ge=1, description="stop after this many optimizer steps (the schedule "
                                                             "still spans num_epochs)")
    learning_rate: float = Field(1e-4, gt=0.0, description="peak LR, after the warm-up")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0, description="Adam β1")
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0, description="Adam β2: DiT's 0.999; short runs at a high LR "
                                                                 "train faster with 0.95")
    mixed_precision: Literal["fp16", "bf16", "no"] = Field("fp16", description="fp16, bf16 or no (fp32); fp16 on a "
                                                                               "CPU runs as bf16")
    max_grad_norm: float = Field(1.0, ge=0.0, description="gradient clipping; 0 disables it")
    use_ema: bool = Field(True, description="keep an EMA of the weights (sampling uses it)")
    ema_decay: float = Field(0.9999, ge=0.0, le=1.0, description="EMA decay per optimizer step")
    ema_warmup: bool = Field(True, description="decay min(ema_decay, (1 + step) / (10 + step)): a useful EMA in "
                                               "short runs")
    posthoc_ema: bool = Field(False, description="post-hoc EMA (EDM2): also track power-function EMAs and snapshot "
                                                 "them (checkpointing.phema_every), so `ditpipe ema` can rebuild an "
                                                 "EMA of any width after training")
    posthoc_ema_sigmas: list[float] = Field([0.05, 0.10], description="σ_rel of the tracked power-function EMAs "
                                                                      "(EDM2's two); each in (0, 0.2887]")
    max_nonfinite_steps: int = Field(10, ge=1, description="non-finite losses in a row before the run stops "
                                                           "(read at log steps)")
    recover: bool = Field(False, description="after the non-finite stop rule or a loss spike, go back to the last good "
                                             "checkpoint in-process, skip the data the failure consumed, go on "
                                             "(pipeline/recovery.py)")
    recover_spike_factor: float = Field(3.0, ge=0.0, description="a spike step: the loss above this × its running "
                                                                 "median; 0 turns spike recovery off")
    recover_spike_steps: int = Field(20, ge=1, description="spike steps in a row that make a recovery")
    recover_window: int = Field(200, ge=10, description="steps in the spike watch's running median")
    recover_lr_factor: float = Field(1.0, gt=0.0, le=1.0, description="the LR is multiplied by this at each recovery")
    recover_max: int = Field(3, ge=1, description="recoveries before the run stops as without training.recover")
    deterministic: bool = Field(False, description="CUDA: deterministic kernels, so a resumed run continues bit for "
                                                   "bit (slower); off: equal only statistically")
    tf32: bool = Field(True, description="CUDA: fp32 matmuls and convolutions on tensor cores (off when "
                                         "deterministic)")
    repa: RepaConfig = RepaConfig()
    parallel: Literal["ddp", "fsdp"] = Field("ddp", description="ddp (a full copy of the model per process) or fsdp "
                                                              "(PyTorch's FSDP2 `fully_shard`: parameters, gradients, "
                                                              "optimizer and EMAs sharded per DiT block)")
    fsdp_cpu_offload: bool = Field(False, description="fsdp: keep the sharded parameters, gradients and optimizer "
                                                      "state in CPU memory between uses (slower; fits larger models)")
    threads: Optional[int] = Field(None, ge=1, le=1024, description="CPU threads for torch's operators, per "
                                                                    "process; null: OMP_NUM_THREADS if set, else on "
                                                                    "a CPU the cores other work leaves free")

    @field_validator("posthoc_ema_sigmas")
    @classmethod
    def _sigmas(cls, v):
        bad = [s for s in v if not 0.0 < s <= POSTHOC_MAX_SIGMA_REL]
        if not v or bad or len(set(v)) != len(v):
            raise ValueError(f"needs distinct σ_rel values in (0, {POSTHOC_MAX_SIGMA_REL:.4f}], e.g. [0.05, 0.10]"
                             f"{f'; out of range: {bad}' if bad else ''}")
        return v

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, v):  # YAML 1.1 reads a bare `no` as false
        return "no" if v is False else v


class LrSchedulerConfig(_Section):
    type: Literal["cosine", "constant", "linear"] = Field("cosine", description="cosine or linear to 0, or constant")
    warmup_steps: int = Field(500, ge=0, description="optimizer steps of linear warm-up")


class CheckpointingConfig(_Section):
    steps: int = Field(500, ge=1, description="a checkpoint every N optimizer steps")
    every_epoch: bool = Field(True, description="also a checkpoint at every epoch's end")
    total_limit: Optional[int] = Field(None, ge=1, description="newest N step checkpoints kept; null keeps all")
    keep_epochs: Optional[int] = Field(3, ge=1, description="newest N epoch checkpoints kept; null keeps all")
    # 500 (the checkpoint cadence) gives the guide's 15,600-step run 31 snapshots, a profile fit within 4 % for
    # σ_rel 0.02-0.25
    phema_every: int = Field(500, ge=1, description="steps between post-hoc EMA snapshots (training.posthoc_ema; "
                                                    "one at the end too): aim for 30 or more over a run")


class LoggingConfig(_Section):
    steps: int = Field(50, ge=1, description="a `Step N, Loss: …` line and a metrics.jsonl line every N steps")
    output_dir: str = Field("./outputs", description="where run folders go")
    run_name: Optional[str] = Field(None, description="the run folder's name; null: the config file's stem")
    tensorboard: bool = Field(True, description="also write TensorBoard scalars")

    @field_validator("run_name")
    @classmethod
    def _one_component(cls, v):  # the run folder is output_dir/run_name: nothing else, and nowhere outside it
        if v is not None and (v in ("", ".", "..") or any(c in v for c in "/\\\0") or Path(v).is_absolute()):
            raise ValueError(f"{v!r} is not a folder name: a run name is one path component, without '/', '\\', "
                             "'..' or an absolute path (logging.output_dir says where runs go)")
        return v


class ValidationConfig(_Section):
    every_steps: int = Field(0, ge=0, description="grids and the held-out loss every N steps; 0 turns both off")
    grid: bool = Field(True, description="sample a grid at each validation; false: the held-out loss only")
    num_samples: int = Field(16, ge=1, le=MAX_GRID, description="samples in each validation grid")
    cfg_scale: float = Field(4.0, ge=1.0, description="guidance scale of the grids; `ditpipe sample` defaults to it")
    cfg_interval: tuple[float, float] = Field(
        (0.0, 1.0), description="noise levels [low, high] (0 data, 1 noise) where guidance applies; sample's default")
    sampling_steps: int = Field(50, ge=1, description="sampling steps of the grids; `ditpipe sample` defaults to it")
    sampler: Optional[Literal[SAMPLER_NAMES]] = Field(
        None, description="sampler of the grids and of `ditpipe sample`; null: the objective's own")
    bf16: bool = Field(True, description="CUDA: sample the grids under bf16 autocast (the sampler's arithmetic "
                                         "stays fp32)")
    prompts: list[str] = Field([], description="caption models: grid prompts; empty: the shards' first captions")
    decoder: Optional[str] = Field(None, description="decode the grids with this autoencoder instead of the run's "
                                                     "codec, e.g. TAESD for an SD-VAE run (same latent space)")
    shards: Optional[str] = Field(None, description="a separately encoded held-out shard folder (instead of "
                                                    "data.val_fraction)")
    loss_timesteps: int = Field(10, ge=1, description="fixed, evenly spaced timesteps per held-out sample")
    loss_max_samples: Optional[int] = Field(1024, ge=1, description="held-out samples evaluated (the first N); null:"
                                                                    " all")
    fid_every_steps: int = Field(0, ge=0, description="FID of the EMA weights every N steps and at the end (every "
                                                      "rank samples its share); 0: off")
    fid_samples: int = Field(2000, ge=2, description="samples per training FID (classes cycled; the grids' sampler, "
                                                     "steps and guidance)")
    fid_reference: Optional[str] = Field(None, description="training FID's real images: an image folder, pixel-codec"
                                                           " shards or an ADM .npz; null: the training shards' images")
    fid_reference_samples: int = Field(10000, ge=2, description="training FID without fid_reference: the first N "
                                                                "images of the training shards")

    @field_validator("cfg_interval")
    @classmethod
    def _interval(cls, v):
        if not 0.0 <= v[0] <= v[1] <= 1.0:
            raise ValueError(f"needs 0 <= low <= high <= 1 (noise levels), got {list(v)}")
        return v


class Config(_Section):
    data: DataConfig = DataConfig()
    shards: ShardsConfig = ShardsConfig()
    storage: StorageConfig = StorageConfig()
    vae: VaeConfig = VaeConfig()
    text: TextConfig = TextConfig()
    targets: TargetsConfig = TargetsConfig()
    model: ModelConfig = ModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    training: TrainingConfig = TrainingConfig()
    lr_scheduler: LrSchedulerConfig = LrSchedulerConfig()
    checkpointing: CheckpointingConfig = CheckpointingConfig()
    logging: LoggingConfig = LoggingConfig()
    validation: ValidationConfig = ValidationConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> "Config":
        problems = []
        if self.data.dataset_name == "shapes" and self.data.num_samples is None:
            problems.append("data.num_samples: the shapes dataset is generated, so it needs a number (got null)")
        samplers = tuple(SAMPLERS[self.diffusion.objective])
        plain = DiffusionConfig()
        for key in ("timestep_mean", "timestep_std"):
            if self.diffusion.objective != "flow" and getattr(self.diffusion, key) != getattr(plain, key):
                problems.append(f"diffusion.{key}: it shapes flow's training times, and ddpm draws its timesteps "
                                "uniformly; set diffusion.objective: flow, or leave it out")
        if self.validation.sampler is not None and self.validation.sampler not in samplers:
            problems.append(f"validation.sampler: {self.validation.sampler!r} does not sample a "
                            f"{self.diffusion.objective} model; use {' or '.join(samplers)}")
        if self.validation.shards and self.data.val_fraction:
            problems.append("validation.shards: a held-out shard folder and data.val_fraction "
                            f"{self.data.val_fraction:g} both name a validation set; keep one")
        if problems:
            raise ValueError(" || ".join(problems))
        return self

    # ---- derived values (computed, never stored, so they cannot disagree with the keys) ----

    @property
    def codec_short_name(self) -> str:
        name = self.vae.name.rstrip("/\\")
        return "pixel" if name == "pixel" else Path(name).name.lower()

    @property
    def shards_path(self) -> Path:
        """shards.path, else the default folder named from the keys: `shards/custom-my_photos-256px-sd-vae-ft-ema-all`.
        A custom folder's shards made before its name was in the default (`shards/custom-256px-…`) are still this
        folder's while no folder of the new name exists: a run on them resumes (shards.path cannot change on
        resume), and encode updates them instead of encoding everything again."""
        if self.shards.path:
            return Path(self.shards.path)
        named = Path("shards") / self._shards_stem(with_folder=True)
        if self.data.dataset_name == "custom" and not (named.exists() or named.is_symlink()):
            legacy = Path("shards") / self._shards_stem(with_folder=False)
            if _encoded_from(legacy, self.data.dataset_path):  # only this folder's: never another's under that name
                return legacy
        return named

    def _shards_stem(self, with_folder: bool) -> str:
        n = "all" if self.data.num_samples is None else str(self.data.num_samples)
        split = f"-{self.data.split}" if self.data.dataset_name == "coco" else ""
        # two custom folders must not share a default shard folder: the source folder's name is in it
        folder = f"-{folder_slug(self.data.dataset_path)}" if self.data.dataset_name == "custom" and with_folder else ""
        stem = f"{self.data.dataset_name}{folder}{split}-{self.data.image_size}px-{self.codec_short_name}-{n}"
        if self.data.captions:  # embeddings of another encoder are other shards
            stem += f"-{Path(self.text.encoder.rstrip('/')).name.lower()}"
        if self.targets.encoder:  # other representation targets are other shards
            stem += f"-{target_short_name(self.targets.encoder)}" + ("-cls" if self.targets.class_token else "") + (
                "-int8" if self.targets.dtype == "int8" else "")
        if self.data.buckets != "square":  # other crops are other shards
            listed = hashlib.sha256(json.dumps(self.data.buckets).encode()).hexdigest()[:8]
            stem += "-auto" if self.data.buckets == "auto" else f"-buckets{listed}"
        return stem

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


# Target encoders by short name (pipeline/targets.py): REPA's DINOv2, and the offline Inception of the eval extra.
TARGET_ALIASES = {"dinov2": "facebook/dinov2-base"}
TARGET_INCEPTION = "inception"


def target_short_name(name: str) -> str:
    """The target encoder's part of a default shard folder name: `dinov2`, `inception`, a folder's or id's last
    component."""
    if name in TARGET_ALIASES or name == TARGET_INCEPTION:
        return name
    return folder_slug(name.rstrip("/\\")) if Path(name).exists() else name.rstrip("/").rsplit("/", 1)[-1].lower()


def folder_slug(path: str) -> str:
    """A folder's last path component as a safe, lower-cased part of a folder name: `data/My Photos/` →
    `my_photos`. Only [a-z0-9._-] survive (accents dropped; anything else, spaces too, becomes one `_`), with no
    leading dot or dash (a hidden folder, an option); `.` and `..` are named by the folder they stand for."""
    name = Path(os.path.abspath(path)).name
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode().lower()  # é → e
    slug = re.sub(r"[^a-z0-9._-]+", "_", ascii_name).lstrip(".-_")[:40].rstrip("._-")
    # a name with no ASCII letter at all (`日本`) keeps a short hash of itself, not one name shared by all such
    return slug or "folder-" + hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def _encoded_from(folder: Path, dataset_path: str) -> bool:
    """Whether `folder` is a shard folder encoded from the images at `dataset_path`, by the encode record written
    first into it (pipeline/shards.py PARAMS; its source.path is resolved): read-only, bounded, never through a link,
    and False for anything damaged or absent."""
    from ditpipe.pipeline.shards import PARAMS

    try:
        if folder.is_symlink():
            return False
        fd = os.open(folder / PARAMS, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return False
            source = json.loads(f.read(1 << 20)).get("source")  # a real record: well under a kilobyte
        return isinstance(source, dict) and source.get("path") == str(Path(dataset_path).resolve())
    except (OSError, ValueError, AttributeError, RecursionError):
        return False


def override_args(keys: dict[str, Any]) -> list[str]:
    """{dotted key: value} as command-line overrides, each value as YAML reads it back (`null`, `true`, `[[1, 2]]`)."""
    return [a for k, v in keys.items() for a in (f"--{k}", v if isinstance(v, str) else json.dumps(v))]


CPU_RECIPE = "cpu"  # configs/cpu.yaml: the small DiT that encode's next step names on a machine without CUDA
GPU_RECIPE = "train_config"


def train_command(cfg: Config, config: str | None, overrides: dict[str, Any],
                  device_type: str) -> tuple[list[str], str | None]:
    """The `ditpipe train` argv that trains on the shards an encode of `cfg` just wrote, and, when it names the CPU
    recipe, a line saying why. `config`, `overrides`: the encode's --config and every override it was given.

    With CUDA (`device_type` "cuda"), or a config of the user's own (quickstart too): that config and the same
    overrides, which name the same folder. On a CPU, in place of the GPU recipe (no --config, or train_config's): the
    CPU recipe, and the folder by `--shards.path` with every key train checks against its manifest at the encode's
    values, so that the recipe's own data keys cannot name another folder or refuse these shards."""
    keys = {k: v for k, v in overrides.items() if k != "data.download"}  # a key of encode's alone
    if cfg.targets.encoder and "training.repa.weight" not in keys:  # targets are encoded to be aligned with
        keys["training.repa.weight"] = REPA_WEIGHT
    if device_type == "cuda" or not _is_gpu_recipe(config):
        _repa_depth(keys, cfg)
        return ["ditpipe", "train", *(["--config", config] if config else []), *override_args(keys)], None
    d = cfg.data
    where = cfg.shards.path if "://" in str(cfg.shards.path) else str(cfg.shards_path)  # a URL is not a Path
    keys |= {"shards.path": where, "data.dataset_name": d.dataset_name, "data.image_size": d.image_size,
             "vae.name": cfg.vae.name, "model.conditioning": cfg.model.conditioning}  # auto: class only where the folder has labels
    if d.captions:
        keys |= {"data.captions": True, "text.encoder": cfg.text.encoder}
    if cfg.targets.encoder:  # they are in the folder's name; cut for this patch; REPA's depth 8 of 28 is a third
        keys |= {"targets.encoder": cfg.targets.encoder, "model.patch_size": cfg.model.patch}
        _repa_depth(keys, load_config(CPU_RECIPE))
    if d.buckets != "square":  # the buckets were cut for this patch size
        keys |= {"data.buckets": d.buckets, "model.patch_size": cfg.model.patch}
    why = (f"(on a CPU: the small recipe configs/{CPU_RECIPE}.yaml; on a GPU: --config {config or GPU_RECIPE} with "
           "the same keys)")
    return ["ditpipe", "train", "--config", CPU_RECIPE, *override_args(keys)], why


def _repa_depth(keys: dict[str, Any], trained: Config) -> None:
    """With REPA proposed, a block the model `trained` has: REPA's depth 8 (of DiT-XL's 28), or a third of a model
    with fewer than 8 blocks (configs/cpu.yaml's 4: block 1). A preset's depth (None here) is 12 or more."""
    depth = keys.get("model.depth", trained.model.depth)
    default = RepaConfig.model_fields["depth"].default
    if "training.repa.weight" in keys and "training.repa.depth" not in keys and depth and depth < default:
        keys["training.repa.depth"] = max(1, depth // 3)


def _is_gpu_recipe(config: str | None) -> bool:
    """No --config (the defaults are the GPU recipe's), or a file that holds the shipped train_config."""
    if config is None:
        return True
    try:
        return resolve_config_path(config).read_bytes() == shipped_configs()[GPU_RECIPE].read_bytes()
    except (ConfigError, OSError, KeyError):
        return False


SHIPPED_CONFIGS_PACKAGE = "ditpipe.configs"

# Keys that may differ between a run's saved config and the one it resumes with (docs/design.md, Config):
# where and how long it runs, and keys the trained weights never see: the data order and every random draw are
# keyed on (seed, epoch, sample, step), not on the worker count; validation runs on a copy under a forked RNG;
# the download and encode keys (vae.batch_size, text.batch_size, targets.batch_size) are read by `encode` only; max_nonfinite_steps
# and training.recover* only decide what a failing run does; training.threads changes no result (pipeline/threads.py).
# training.batch_size and gradient_accumulation_steps change the split of the global batch, never the samples or the
# draws, and train() refuses any that does not keep the run's global batch (pipeline/run.py, elastic_split). A key
# ending in "." stands for its whole section.
RESUMABLE_CHANGES = ("training.num_epochs", "training.max_steps", "training.max_nonfinite_steps", "training.recover",
                     "training.threads", "training.batch_size", "training.gradient_accumulation_steps",
                     "data.num_workers", "data.download", "storage.", "vae.batch_size", "text.batch_size", "targets.batch_size",
                     "logging.",
                     "checkpointing.", "validation.")


def resumable_keys() -> str:
    """RESUMABLE_CHANGES for people: `training.num_epochs, …, logging.*, checkpointing.* and validation.*`; a `*` marks
    an entry that covers more than one key (training.recover*: recover, recover_max, …)."""
    keys = known_keys()
    names = [k + "*" if any(x != k and x.startswith(k) for x in keys) else k for k in RESUMABLE_CHANGES]
    return ", ".join(names[:-1]) + " and " + names[-1]


def known_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, e.g. `training.batch_size`."""
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += known_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def key_table(cfg: Config) -> list[tuple[str, Any, Any, str]]:
    """(dotted key, value in `cfg`, default, one line of meaning) for every key, in schema order: `config show`."""
    def walk(values: BaseModel, prefix: str) -> list[tuple[str, Any, Any, str]]:
        rows = []
        for name, field in type(values).model_fields.items():
            value = getattr(values, name)
            if isinstance(value, BaseModel):  # a subsection (training.repa): its keys, dotted
                rows += walk(value, f"{prefix}{name}.")
            else:
                rows.append((f"{prefix}{name}", value, field.default, field.description or ""))
        return rows

    return walk(cfg, "")


def shipped_configs() -> dict[str, Path]:
    """The configs installed with ditpipe, by name (`train_config`, `quickstart`)."""
    root = resources.files(SHIPPED_CONFIGS_PACKAGE)
    return {Path(str(p.name)).stem: Path(str(p)) for p in root.iterdir() if str(p.name).endswith(".yaml")}


def resolve_config_path(spec: str) -> Path:
    """A path that exists wins; otherwise a shipped config's name (`quickstart`, `train_config.yaml`,
    `configs/quickstart.yaml`) resolves to the installed copy, so it works outside the repo too."""
    path = Path(spec)
    if path.is_file():
        return path
    shipped = shipped_configs()
    name = path.stem if path.suffix in (".yaml", ".yml") else path.name
    if name in shipped and (path.parent == Path(".") or path.parent.name == "configs"):
        return shipped[name]
    raise ConfigError(
        [("--config", f"no file '{spec}'; shipped configs are: {', '.join(sorted(shipped))}")],
        header="config file not found",
    )


def flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A config tree as {dotted key: value}, subsections (training.repa) included."""
    out = {}
    for k, v in tree.items():
        out |= flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def parse_value(text: str) -> Any:
    """A command-line value, read the way YAML reads it (`null`, `true`, `8`, `[1, 2]`), but numbers written like
    `1e-4` stay numbers (PyYAML's YAML 1.1 reads them as strings; pydantic coerces strings later anyway)."""
    try:
        value = safe_yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        return text
    return float(value) if isinstance(value, str) and _is_number(value) else value


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`--data.dataset_name custom`, `--data.dataset_name=custom`, `--set data.dataset_name=custom` → {key: value}.
    Anything else is a problem reported with the rest."""
    out: dict[str, Any] = {}
    problems: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--set":
            if i + 1 >= len(args) or "=" not in args[i + 1]:
                problems.append(("--set", "expects KEY=VALUE, e.g. --set training.batch_size=8"))
                i += 1 if i + 1 >= len(args) or args[i + 1].startswith("--") else 2
                continue
            key, _, value = args[i + 1].partition("=")
            out[key.strip()] = parse_value(value)
            i += 2
        elif arg.startswith("--") and "." in arg.split("=", 1)[0]:
            key, eq, value = arg[2:].partition("=")
            if not eq:
                if i + 1 >= len(args) or (args[i + 1].startswith("--") and not _is_number(args[i + 1])):
                    problems.append((key, "needs a value, e.g. --" + key + " VALUE"))
                    i += 1
                    continue
                value = args[i + 1]
                i += 1
            out[key] = parse_value(value)
            i += 1
        else:
            problems.append((arg, "unexpected argument; overrides look like --section.key VALUE or --set section.key=VALUE"))
            i += 1
    if problems:
        raise ConfigError(problems, header="bad command-line overrides")
    return out


_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _is_number(text: str) -> bool:
    return bool(_NUMBER.match(text.strip()))


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults ← YAML file ← overrides, validated at once. Raises ConfigError with every problem."""
    tree: dict[str, Any] = {}
    if path is not None:
        tree = read_yaml(resolve_config_path(str(path)))
    for key, value in (overrides or {}).items():
        set_dotted(tree, key, value)
    return validate_tree(tree)


def read_yaml(file: Path) -> dict[str, Any]:
    """A config file's tree. Anything unreadable (bad YAML, nesting deep enough to exhaust the parser, a document
    too large for memory, bytes that are not text) is a ConfigError naming the file, never a traceback."""
    try:
        loaded = safe_yaml.safe_load(Path(file).read_text())  # no aliases: they can expand to gigabytes
    except yaml.YAMLError as e:
        raise ConfigError([(str(file), f"is not valid YAML: {e}")], header="cannot read config") from None
    except (RecursionError, MemoryError, UnicodeDecodeError, OSError) as e:
        raise ConfigError([(str(file), f"cannot be read as YAML ({type(e).__name__}: {str(e)[:200]})")],
                          header="cannot read config") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError([(str(file), "must hold a mapping of sections (data:, training:, ...)")])
    return loaded or {}


def load_saved_config(file: Path) -> Config:
    """A config that ditpipe wrote (a checkpoint's config.yaml) and anyone may have altered: read and validated,
    every problem reported under the file's name."""
    try:
        return validate_tree(read_yaml(file))
    except ConfigError as e:
        raise ConfigError(e.problems, header=f"invalid configuration in '{file}'") from None


def validate_tree(tree: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_describe(e)) from None


def suggest(key: str, keys: list[str]) -> str | None:
    """The known key a misspelt one most likely meant: the same name in another (or a misspelt) section first
    (`training.image_size` → `data.image_size`, `trainig.batch_size` → `training.batch_size`), then spelling."""
    leaf = key.rsplit(".", 1)[-1]
    same = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
    if same:
        return max(same, key=lambda k: difflib.SequenceMatcher(None, key, k).ratio())
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    return close[0] if close else None


def _describe(err: ValidationError) -> list[tuple[str, str]]:
    keys = known_keys()
    problems = []
    for item in err.errors():
        key = ".".join(str(p) for p in item["loc"])
        if item["type"] == "extra_forbidden":
            got = item.get("input")
            # An unknown section (`--trainig.batch_size`) arrives as one dict: judge each dotted key in it.
            for bad in [f"{key}.{k}" for k in got] if isinstance(got, dict) and got else [key]:
                close = suggest(bad, keys)
                problems.append((bad, "unknown key" + (f"; did you mean '{close}'?" if close else "")))
        elif item["type"] == "value_error" and not key:
            for part in str(item["msg"]).removeprefix("Value error, ").split(" || "):
                k, _, msg = part.partition(": ")
                problems.append((k, msg))
        else:
            got = item.get("input")
            got_text = "" if isinstance(got, dict) else f" (got {reprlib.repr(got)})"  # bounded: YAML aliases nest
            problems.append((key or "<root>", f"{item['msg']}{got_text}"))
    return problems
