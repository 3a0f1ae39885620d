"""The typed config: every default lives here, once.

A YAML file holds only what differs from these defaults. Dotted overrides (`--data.dataset_name custom`,
`--set training.batch_size=8`) are applied on top, then the whole tree is validated and *every* problem is
reported at once, each with its dotted key. This module imports no torch, so `ditpipe --help` stays fast.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import ConfigError

# The widest power-function EMA profile (γ = 0: the plain running mean); a wider one would weigh old weights more.
POSTHOC_MAX_SIGMA_REL = 12 ** -0.5


class _Section(BaseModel):
    # Unknown keys are errors (with a suggestion), never silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class DataConfig(_Section):
    dataset_name: Literal["coco", "custom", "shapes"] = "coco"
    dataset_path: str = "./data"  # COCO root or custom folder; unused for shapes
    split: Literal["train", "val"] = "train"  # COCO split: train2017 / val2017
    image_size: int = Field(256, ge=8, le=4096)
    num_samples: Optional[int] = Field(5000, ge=1)  # deterministic subset; null = all
    seed: int = Field(0, ge=0)  # picks the subset and generates `shapes`; separate from training.seed
    captions: bool = False  # embed every caption once with text.encoder (needs the `text` extra)
    source: Literal["shards", "images"] = "shards"  # images = online VAE every step (the baseline)
    num_workers: int = Field(4, ge=0, le=256)
    shuffle_window: int = Field(8, ge=1)  # shards shuffled together each epoch: locality vs. mixing
    download: bool = False  # COCO only: fetch the official archives first
    download_url: str = "http://images.cocodataset.org"  # COCO mirror (tests point it at 127.0.0.1)
    # scale: the codec's scaling/shift factors (DiT); channel: the manifest's per-channel mean/std (LightningDiT, EDM2)
    latent_norm: Literal["scale", "channel"] = "scale"
    # Held out from training for the validation loss: a deterministic subset (keyed on data.seed), never trained on
    val_fraction: float = Field(0.0, ge=0.0, lt=1.0)


class ShardsConfig(_Section):
    path: Optional[str] = None  # default: shards/<dataset>-<split>-<size>px-<codec>-<num_samples|all>
    format: Literal["wds", "parquet"] = "wds"
    samples_per_shard: int = Field(1000, ge=1)
    store: Literal["mean_std", "mean"] = "mean_std"
    flip: bool = True


class TextConfig(_Section):
    # The caption encoder (data.captions): minilm (offline) | clip | t5 | a hub id or local folder (pipeline/text.py)
    encoder: str = "minilm"
    max_tokens: int = Field(77, ge=1, le=77)  # per caption; longer captions are truncated
    batch_size: int = Field(256, ge=1)  # captions per encoder call


class VaeConfig(_Section):
    name: str = "stabilityai/sd-vae-ft-ema"  # diffusers id, local folder, or "pixel"
    dtype: Literal["fp32", "bf16"] = "fp32"  # never fp16: SD VAEs overflow to NaN there
    use_slicing: bool = False
    batch_size: int = Field(32, ge=1)  # encode batch; halved on out-of-memory


class ModelConfig(_Section):
    name: str = "DiT-B/2"
    hidden_size: Optional[int] = Field(None, ge=1)
    depth: Optional[int] = Field(None, ge=1)
    num_heads: Optional[int] = Field(None, ge=1)
    patch_size: Optional[int] = Field(None, ge=1)
    conditioning: Literal["auto", "class", "none", "caption"] = "auto"
    # Fine-tuning: start from these weights (an official DiT .pt, our checkpoint or run folder, or an exported
    # .safetensors); the step count and the optimizer start fresh. Ignored on resume.
    init_from: Optional[str] = None
    init_weights: Literal["ema", "raw"] = "ema"  # which weights of one of our checkpoints init_from takes
    learn_sigma: bool = True
    class_dropout_prob: float = Field(0.1, ge=0.0, lt=1.0)  # CFG dropout of the label or the caption, per sample
    qk_norm: bool = False
    gradient_checkpointing: bool = False
    compile: bool = False


class DiffusionConfig(_Section):
    objective: Literal["ddpm", "flow"] = "ddpm"


class TrainingConfig(_Section):
    seed: int = Field(0, ge=0)
    batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(4, ge=1)
    num_epochs: int = Field(50, ge=1)
    max_steps: Optional[int] = Field(None, ge=1)
    learning_rate: float = Field(1e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0)  # DiT's; short runs at a high LR train faster with 0.95
    mixed_precision: Literal["fp16", "bf16", "no"] = "fp16"
    max_grad_norm: float = Field(1.0, ge=0.0)  # 0 disables clipping
    use_ema: bool = True
    ema_decay: float = Field(0.9999, ge=0.0, le=1.0)
    ema_warmup: bool = True
    # Post-hoc EMA (EDM2): also track power-function EMAs of these relative widths and snapshot them
    # (checkpointing.phema_every), so `ditpipe ema` can reconstruct an EMA of any width after training
    posthoc_ema: bool = False
    posthoc_ema_sigmas: list[float] = [0.05, 0.10]  # σ_rel of the tracked EMAs (EDM2's two); each in (0, 0.2887]
    max_nonfinite_steps: int = Field(10, ge=1)  # non-finite losses in a row before the run stops (read at log steps)
    # CUDA: deterministic kernels, so a resumed run continues bit for bit (slower; off: equal only statistically)
    deterministic: bool = False
    tf32: bool = True  # CUDA: fp32 matmuls and convolutions on tensor cores (ignored when deterministic)

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
    type: Literal["cosine", "constant", "linear"] = "cosine"
    warmup_steps: int = Field(500, ge=0)


class CheckpointingConfig(_Section):
    steps: int = Field(500, ge=1)
    every_epoch: bool = True
    total_limit: Optional[int] = Field(None, ge=1)  # newest N step checkpoints kept; null keeps all
    keep_epochs: Optional[int] = Field(None, ge=1)  # newest N epoch checkpoints kept; null keeps all
    # Steps between post-hoc EMA snapshots (training.posthoc_ema; also one at the end): aim for 30+ over a run.
    # 500 (the checkpoint cadence) gives the guide's 15,600-step run 31, a profile fit within 4 % for σ_rel 0.02-0.25
    phema_every: int = Field(500, ge=1)


class LoggingConfig(_Section):
    steps: int = Field(50, ge=1)
    output_dir: str = "./outputs"
    run_name: Optional[str] = None  # default: the config file's stem
    tensorboard: bool = True


class ValidationConfig(_Section):
    every_steps: int = Field(0, ge=0)  # grids and the held-out loss; 0 turns both off
    grid: bool = True  # sample a grid each time (decodes with the codec); false: the held-out loss only
    num_samples: int = Field(16, ge=1)
    cfg_scale: float = Field(4.0, ge=1.0)
    cfg_interval: tuple[float, float] = (0.0, 1.0)  # noise levels (0 data, 1 noise) where guidance applies
    sampling_steps: int = Field(50, ge=1)
    sampler: Optional[Literal["ddpm", "ddim", "euler", "heun"]] = None  # default: the objective's own
    bf16: bool = True  # CUDA: sample the grids under bf16 autocast (the sampler's arithmetic stays fp32)
    prompts: list[str] = []  # caption models: grid prompts; default: the first distinct captions in the shards
    # The held-out loss: on a separately encoded shard folder (e.g. COCO `--split val`), or on data.val_fraction
    shards: Optional[str] = None
    loss_timesteps: int = Field(10, ge=1)  # fixed, evenly spaced timesteps per held-out sample
    loss_max_samples: Optional[int] = Field(1024, ge=1)  # the first N held-out samples (by index); null: all

    @field_validator("cfg_interval")
    @classmethod
    def _interval(cls, v):
        if not 0.0 <= v[0] <= v[1] <= 1.0:
            raise ValueError(f"needs 0 <= low <= high <= 1 (noise levels), got {list(v)}")
        return v


class Config(_Section):
    data: DataConfig = DataConfig()
    shards: ShardsConfig = ShardsConfig()
    vae: VaeConfig = VaeConfig()
    text: TextConfig = TextConfig()
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
        samplers = {"ddpm": ("ddpm", "ddim"), "flow": ("euler", "heun")}[self.diffusion.objective]
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
        if self.shards.path:
            return Path(self.shards.path)
        n = "all" if self.data.num_samples is None else str(self.data.num_samples)
        split = f"-{self.data.split}" if self.data.dataset_name == "coco" else ""
        stem = f"{self.data.dataset_name}{split}-{self.data.image_size}px-{self.codec_short_name}-{n}"
        if self.data.captions:  # embeddings of another encoder are other shards
            stem += f"-{Path(self.text.encoder.rstrip('/')).name.lower()}"
        return Path("shards") / stem

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


SHIPPED_CONFIGS_PACKAGE = "ditpipe_configs"


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


def _set_dotted(tree: dict, key: str, value: Any) -> None:
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
        value = yaml.safe_load(text) if text.strip() else text
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
        file = resolve_config_path(str(path))
        try:
            loaded = yaml.safe_load(file.read_text())
        except yaml.YAMLError as e:
            raise ConfigError([(str(file), f"is not valid YAML: {e}")], header="cannot read config") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError([(str(file), "must hold a mapping of sections (data:, training:, ...)")])
        tree = loaded or {}
    for key, value in (overrides or {}).items():
        _set_dotted(tree, key, value)
    return validate_tree(tree)


def validate_tree(tree: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_describe(e)) from None


def _describe(err: ValidationError) -> list[tuple[str, str]]:
    keys = known_keys()
    problems = []
    for item in err.errors():
        key = ".".join(str(p) for p in item["loc"])
        if item["type"] == "extra_forbidden":
            # A known key under another section first (`training.image_size` → `data.image_size`), then spelling.
            leaf = key.rsplit(".", 1)[-1]
            close = [k for k in keys if k.rsplit(".", 1)[-1] == leaf][:1]
            close = close or difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            problems.append((key, f"unknown key{hint}"))
        elif item["type"] == "value_error" and not key:
            for part in str(item["msg"]).removeprefix("Value error, ").split(" || "):
                k, _, msg = part.partition(": ")
                problems.append((k, msg))
        else:
            got = item.get("input")
            got_text = "" if isinstance(got, dict) else f" (got {got!r})"
            problems.append((key or "<root>", f"{item['msg']}{got_text}"))
    return problems
