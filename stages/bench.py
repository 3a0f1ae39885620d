"""`ditpipe bench`: measure what ditpipe promises, on this machine, in one run.

    ditpipe bench [encode|loader|train|memory|all] [--device cpu|cuda] [--json out.json] [size options]
    (several parts as a comma-separated list: `ditpipe bench encode,train`)

Every measurement runs in a fresh subprocess (`python -c "from ditpipe.stages.bench import _child_main; ..."`), so
its peak memory and its imports are its own, and the parts that a ratio compares are measured in the same invocation.
Progress goes to stderr; one JSON object goes to stdout (and to `--json`).

Parts
-----
encode   our real encode stage (`stages.encode.encode`: decode workers, ADM crop, codec, shard writer, manifest)
         against the bare VAE forward at the same batch and size, running the same forwards (image and mirror, in
         chunks of the encode batch, as `encode_with_backoff` does; `codec.forward`, the encoder alone). Both rates
         are steady-state: images after the first batch over the time from its end to the last batch's end (the
         pipeline's batches are stamped through encode's `on_batch` callback); the whole call's rate (codec load
         and hash, workers, manifest) is reported beside. Plus JPEG decode with and without PIL's draft mode. VAE
         shapes: `sd` (sd-vae-ft-ema's architecture with random weights: the same cost), `dc-ae` (DC-AE f32c32's,
         Sana's: 32× down, 32 channels, deterministic) or `tiny`; all are built offline and loaded through
         `from_pretrained`, the real loading path.
loader   training-ready samples/s (flip chosen, the stored fp16 slices copied and collated into batches: what
         `MicroBatches` yields through `make_loader`; ε is drawn by the training step on the device) from our tar shards and our Parquet shards, against fast-DiT's layout (one `.npy` per
         sample for the latent, one for the label) read by `np.load` and then doing the very same work (the same
         `MicroBatches` with a per-file store), the same samples, order, batch and worker count. Each trial times a
         second pass with warm workers; trials rotate the three readers. Also single-process per-sample costs.
train    steps/s with precomputed latents against the online-VAE mode (`data.source: images`), through the very
         set-up and step that `ditpipe train` runs (`pipeline.step.build_step` and `Step`; `pipeline.training`'s
         data, model and batches; `pipeline.device.make_accelerator`), timed with one device sync per timed block,
         never per step; the ideal speedup (t_step + t_vae) / t_step from the two parts timed alone, and the
         achieved fraction of it. FLOPs as `pipeline.step.FLOPS_CONVENTION` states (2 per multiply-add; 3 forwards
         a step, 4 with gradient checkpointing; `torch.utils.flop_counter`), as train's closing MFU; the JSON
         carries that statement. MFU needs a peak (known GPUs, or `--peak-tflops`).
         With `--repa`: the precomputed step again with REPA (`training.repa.weight` 0.5, its default depth and
         `--repa-projector-dim`), on the same shards, which then carry random targets of REPA's shape for the
         model's token grid (`--repa-target-dim` wide, DINOv2-B's 768; one a DiT token; fp16; the mirror's too, as
         the latents' flips); the step's seconds and img/s with and without, their ratios, and the bytes a sample
         of latents and of targets.
memory   peak memory of a training process (precomputed vs online, DataLoader in-process, a few steps): VmHWM on
         CPU, `torch.cuda.max_memory_allocated` on CUDA; whether the process imported diffusers / built an
         AutoencoderKL. And the loader's peak RSS (main process + workers' peaks) streaming over pixel-codec shards
         of `--memory-small` against `--memory-large` samples, for tar and Parquet: the same number of batches
         (`--memory-large` samples' worth) from both, so only the data set's size differs.

JSON (schema "ditpipe-bench/1"; rates per second of wall time, times in seconds, memory in MiB)
-----------------------------------------------------------------------------------------------
  schema, ditpipe, created, command, parts, settings{...}, machine{device, device_name, cpu_count, torch,
  torch_threads, python, platform, peak_tflops, load_avg_before, load_avg_after}
  encode{vae_shape, vae_dtype, image_size, batch_size, images, source, num_workers, forwards_per_image,
         timed_images, pipeline_images_per_s, pipeline_s, bare_images_per_s, bare_s, ratio,
         pipeline_end_to_end_images_per_s, pipeline_end_to_end_s, shard_bytes, vae_load_s, vae_hash_s,
         vae_encoder_gflops_per_image,
         jpeg{count, size, image_size, draft_images_per_s, full_images_per_s, draft_speedup, draft_decoded_size,
              load_image_images_per_s}}
  loader{samples, sample_shape, batch_size, num_workers, repeats, tar_samples_per_s, parquet_samples_per_s,
         npy_samples_per_s, tar_over_npy, parquet_over_npy, trials{tar, parquet, npy},
         per_sample_us{worker_tar, worker_parquet, worker_npy,   (CPU µs a sample: W stores round-robin over one
                                                                  epoch from cold, as the workers run, opens included)
                       microbatch_tar, microbatch_parquet, microbatch_npy,  (the same, shards open: per-sample work)
                       read_tar, read_parquet, read_npy, sample_key, latent_view,   (its parts)
                       eps_draw},          (a keyed CPU ε draw: what the loader no longer does, for comparison)
         cpu_ceiling_samples_per_s{tar, parquet, npy}         (cores / worker CPU time: no loader can beat it),
         loader_cpu_us_per_sample{tar, parquet, npy}          (CPU of the timed pass, main + workers, a sample:
                                                               unlike the rate, barely moved by other load),
         cpu_bound_samples_per_s{tar, parquet, npy}           (cores / that: the rate on an otherwise idle machine),
         eps_ceiling_samples_per_s}                           (cores / ε draw alone: the old loader's bound)
  loader with --shards URL (instead of the above): {shards, samples, num_shards, shard_bytes, batch_size,
         num_workers, repeats, remote{local_samples_per_s, cold_samples_per_s, warm_samples_per_s, cold_ratio,
         warm_ratio, mb_per_s{local, cold, warm}, prefetch_shards, open_s{...}, trials{local, cold, warm}}}
         (one epoch through make_loader from a local copy, from the URL with an empty shard cache and with a full one)
  train{model, vae_shape, vae_dtype, image_size, latent_shape, batch_size, accum, precision, num_workers,
        precomputed{steps, seconds, steps_per_s, images_per_s}, online{...}, speedup, t_step_s, t_vae_s,
        ideal_ratio, achieved_fraction, gradient_checkpointing, flops_convention, dit_gflops_per_step,
        vae_gflops_per_step, mfu_precomputed, mfu_online,
        extrapolate{images, precomputed_s, online_s},
        repa{weight, depth, projector_dim, projector_params, projector_gflops_per_step, target_dim, target_tokens,
             target_slices, latent_bytes_per_sample, target_bytes_per_sample, target_over_latent,
             shard_bytes_per_sample,     (on disk, tar: latents, targets and metadata)
             without{steps, seconds, steps_per_s, images_per_s, step_seconds, t_step_s}, with{...},  (step_seconds:
                                         through the loader, 1 / steps_per_s; t_step_s: the step alone)
             step_seconds_ratio, t_step_ratio, images_per_s_ratio}}   (with / without; only with --repa)
  memory{train{steps, batch_size, precomputed{peak_mib, cuda_peak_mib, diffusers_imported, vae_constructed},
               online{...}, online_over_precomputed},
         loader{image_size, batch_size, num_workers, small_samples, large_samples,
                wds{small{samples, streamed, main_peak_mib, workers_peak_mib, total_peak_mib, workers}, large{...},
                    ratio, main_ratio},
                parquet{...}}}
  targets[{name, part, target, value, met, applies}]   (the project's performance targets; `applies` is false
                                                        when the run's settings differ from the stated ones)
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ditpipe.pipeline import __version__
from ditpipe.pipeline.manifest import Manifest, build_manifest, manifest_header
from ditpipe.pipeline.workers import usable_cpus
from ditpipe.pipeline.errors import ConfigError, DitpipeError

SCHEMA = "ditpipe-bench/1"
PARTS = ("encode", "loader", "train", "memory")
MARKER = "DITPIPE-BENCH-RESULT "
NUM_CLASSES = 8  # the synthetic latents carry shapes' 8 labels, so both train modes build the same model


@dataclass
class BenchOptions:
    """Sizes and settings. Zero / None means "the device's default" (resolved in `resolved()`)."""

    device: str = "cpu"
    vae_shape: str = "sd"
    vae_dtype: str = "fp32"
    image_size: int = 256
    model: str = "DiT-S/2"
    precision: str = "fp16"  # as training.mixed_precision, resolved per device as training does (CPU: bf16)
    compile: bool = False
    gradient_checkpointing: bool = False  # model.gradient_checkpointing: the recomputed forward counts in the FLOPs
    batch_size: int = 0  # train micro-batch: 4 on CPU, 256 on CUDA
    accum: int = 1
    steps: int = 0  # timed steps at least: 3 on CPU, 20 on CUDA
    warmup: int = 0  # untimed steps first: 1 on CPU, 3 on CUDA
    min_seconds: float = 0.0  # keep timing cheap loops at least this long: 5 s on CPU, 5 s on CUDA
    encode_images: int = 0  # images through the encode stage: 12 on CPU, 1024 on CUDA (the first batch untimed)
    encode_batch: int = 0  # vae.batch_size: 4 on CPU, 32 on CUDA
    encode_source: str = "jpeg"  # jpeg (generated ~640x480 photos-like JPEGs, custom folder) | shapes
    jpeg_count: int = 64
    jpeg_width: int = 640
    jpeg_height: int = 480
    loader_samples: int = 20000
    loader_batch: int = 256
    num_workers: int = -1  # -1: data.num_workers' default
    repeats: int = 3
    memory_small: int = 1000
    memory_large: int = 100000
    memory_image_size: int = 8
    memory_steps: int = 2
    peak_tflops: float = 0.0  # 0: from the device name (CUDA), none on CPU
    threads: int = 0  # torch threads in each measuring process; 0: as `train` chooses (pipeline/threads.py)
    extrapolate_images: int = 250000  # 50 epochs × 5,000 images
    workdir: str = ""  # default: a temporary folder, removed afterwards
    seed: int = 0
    repa: bool = False  # bench train: the precomputed step with REPA too, on the same shards (with targets)
    repa_projector_dim: int = 2048  # training.repa.projector_dim (REPA's)
    repa_target_dim: int = 768  # the synthetic targets' width (DINOv2-B's, REPA's encoder)
    shards: str = ""  # bench loader: a URL shard folder (s3://...) read cold, warm and from a local copy instead

    def resolved(self) -> "BenchOptions":
        from ditpipe.pipeline.config import DataConfig

        cuda = self.device == "cuda"
        o = BenchOptions(**asdict(self))
        o.batch_size = o.batch_size or (256 if cuda else 4)
        o.steps = o.steps or (20 if cuda else 3)
        o.warmup = o.warmup or (3 if cuda else 1)
        o.min_seconds = o.min_seconds or 5.0
        o.encode_images = o.encode_images or (1024 if cuda else 12)
        o.encode_batch = o.encode_batch or (32 if cuda else 4)
        o.num_workers = DataConfig().num_workers if o.num_workers < 0 else o.num_workers
        return o

    def check(self) -> None:
        from ditpipe.pipeline.codec import SHAPES as VAE_SHAPES  # sd-vae-ft-ema's architecture, tiny, DC-AE f32c32's
        from ditpipe.pipeline.model import DIT_PRESETS

        problems = []
        if self.device not in ("cpu", "cuda"):
            problems.append(("--device", f"{self.device!r}: use cpu or cuda"))
        if self.vae_shape not in VAE_SHAPES:
            problems.append(("--vae-shape", f"{self.vae_shape!r}: use {' or '.join(VAE_SHAPES)}"))
        if self.vae_dtype not in ("fp32", "bf16"):
            problems.append(("--vae-dtype", f"{self.vae_dtype!r}: use fp32 or bf16 (never fp16)"))
        if self.precision not in ("fp16", "bf16", "no"):
            problems.append(("--precision", f"{self.precision!r}: use fp16, bf16 or no"))
        if self.model not in DIT_PRESETS:
            problems.append(("--model", f"{self.model!r}: one of {', '.join(DIT_PRESETS)}"))
        if self.image_size % 8 or self.image_size < 16:
            problems.append(("--image-size", f"{self.image_size}: a multiple of 8 (the VAE's downsample), ≥ 16"))
        elif self.vae_shape == "dc-ae" and self.image_size % 32:
            problems.append(("--image-size", f"{self.image_size}: a multiple of 32 for --vae-shape dc-ae (32× down)"))
        if self.encode_source not in ("jpeg", "shapes"):
            problems.append(("--encode-source", f"{self.encode_source!r}: use jpeg or shapes"))
        for name in ("repeats", "loader_batch", "memory_steps", "jpeg_count", "accum", "repa_projector_dim",
                     "repa_target_dim"):
            if getattr(self, name) < 1:
                problems.append((f"--{name.replace('_', '-')}", "must be at least 1"))
        if self.loader_samples < self.loader_batch:
            problems.append(("--loader-samples", f"{self.loader_samples} is less than one batch "
                                                 f"({self.loader_batch})"))
        if not 0 < self.memory_small <= self.memory_large:
            problems.append(("--memory-small", "must be positive and at most --memory-large"))
        if self.memory_small < self.loader_batch:
            problems.append(("--memory-small", f"{self.memory_small} is less than one loader batch "
                                               f"({self.loader_batch}); lower --loader-batch"))
        if self.memory_image_size < 8:
            problems.append(("--memory-image-size", "at least 8"))
        if self.repa and self.model in DIT_PRESETS and (self.image_size // 8) % DIT_PRESETS[self.model]["patch_size"]:
            problems.append(("--repa", f"the latent side {self.image_size // 8} is not a whole number of "
                                       f"{self.model}'s patches: no token grid for the targets"))
        if self.shards:
            from ditpipe.pipeline import remote

            if not remote.is_url(self.shards):
                problems.append(("--shards", f"{self.shards!r}: a URL shard folder (s3://bucket/prefix); a local "
                                             "folder is what the loader part measures without it"))
        if problems:
            raise ConfigError(problems, header="invalid bench options")


# ---------------------------------------------------------------------------------------------------- the run


def command_line(parts: list[str], opts: BenchOptions) -> str:
    """The `ditpipe bench` command that reproduces these options (defaults left out)."""
    flags = {"compile": "--compile", "gradient_checkpointing": "--gradient-checkpointing", "repa": "--repa"}
    args = ["ditpipe", "bench", ",".join(parts)]
    for key, value in asdict(opts).items():
        if value == getattr(BenchOptions, key):
            continue
        flag = flags.get(key, "--" + key.replace("_", "-"))
        args += [flag] if isinstance(value, bool) else [flag, str(value)]
    return " ".join(args)


def run(parts: list[str], opts: BenchOptions, json_out: Path | None = None) -> dict:
    """Run the parts (in order), print the JSON to stdout, write it to `json_out`. Returns the result."""
    import shutil

    parts_asked = list(parts)
    parts = list(PARTS) if list(parts) == ["all"] else list(parts)
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ConfigError([("PART", f"{p!r}: use one of {', '.join(PARTS)} or all") for p in unknown],
                          header="invalid bench part")
    opts.check()
    o = opts.resolved()
    work = Path(o.workdir) if o.workdir else Path(tempfile.mkdtemp(prefix="ditpipe-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"schema": SCHEMA, "ditpipe": __version__,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "command": command_line(list(parts_asked), opts), "parts": parts,
                    "settings": asdict(o)}
    load_before = _loadavg()
    try:
        result["machine"] = _child("machine", o)
        result["machine"]["load_avg_before"] = load_before
        runners = {"encode": _part_encode, "loader": _part_loader, "train": _part_train, "memory": _part_memory}
        for part in parts:
            t0 = time.time()
            _say(f"part {part} …")
            result[part] = runners[part](o, work)
            _say(f"part {part} done in {time.time() - t0:.1f} s")
        result["machine"]["load_avg_after"] = _loadavg()
        result["targets"] = targets(result)
    finally:
        if not o.workdir:
            shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(result, indent=2)
    if json_out is not None:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(text + "\n")
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
    return result


def _say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _child(task: str, o: BenchOptions, **args) -> dict:
    """Run `task` in a fresh Python process; returns its JSON result. Its stderr (progress) passes through."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a model hub
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    if o.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the stages pick CUDA whenever they see it
    spec = json.dumps({"task": task, "opts": asdict(o), "args": args})
    proc = subprocess.run([sys.executable, "-c", "from ditpipe.stages.bench import _child_main; _child_main()", spec],
                          stdout=subprocess.PIPE, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARKER)]
    if proc.returncode != 0 or not lines:
        raise DitpipeError(f"bench task '{task}' failed in its subprocess (exit {proc.returncode}); its messages "
                           "are above")
    return json.loads(lines[-1][len(MARKER):])


def _child_main() -> None:
    """The subprocess side of `_child`: run one task, print its JSON on stdout after MARKER."""
    spec = json.loads(sys.argv[1])
    o = BenchOptions(**spec["opts"])
    real_stdout, sys.stdout = sys.stdout, sys.stderr  # whatever a library prints stays off the result channel
    import torch

    from ditpipe.pipeline.threads import apply as apply_threads

    # as `train` chooses them (pipeline/threads.py): --threads N, else OMP_NUM_THREADS, else the free cores
    apply_threads(o.threads or None, "cuda" if torch.cuda.is_available() else "cpu")
    result = TASKS[spec["task"]](o, **spec["args"])
    real_stdout.write(MARKER + json.dumps(result) + "\n")
    real_stdout.flush()


# ---------------------------------------------------------------------------------------------------- helpers


def _vm_hwm_mib(pid: int | str = "self") -> float | None:
    """Peak resident set (VmHWM) of a process, MiB; None where /proc is missing."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    if pid == "self":
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return rss / (2**20 if sys.platform == "darwin" else 1024)
    return None


def _cpu_seconds(pids: list[int]) -> float | None:
    """CPU time (user + system) of this process and the processes `pids`; None where /proc is missing."""
    total = time.process_time()
    try:
        tick = os.sysconf("SC_CLK_TCK")
        for pid in pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    except (OSError, ValueError, IndexError):
        return None
    return total


def _sync(device) -> None:
    import torch

    if getattr(device, "type", device) == "cuda":
        torch.cuda.synchronize()


def _timed(fn, min_steps: int, min_seconds: float, sync, every: int = 1) -> tuple[int, float]:
    """Call fn() until at least `min_steps` calls and `min_seconds` have passed; (calls, seconds). The device is
    synchronised only every `every` calls: a training step never syncs, and timing it must not add syncs."""
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        if n % every:
            continue
        sync()
        elapsed = time.perf_counter() - t0
        if n >= min_steps and elapsed >= min_seconds:
            return n, elapsed


def _rate(n: float, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("nan")


def _ratio(a, b):
    return None if a is None or b is None or not b else a / b


def _r(x, nd=4):
    return None if x is None else round(float(x), nd)


def _peak_tflops(o: BenchOptions) -> float | None:
    import torch

    from ditpipe.pipeline.device import peak_tflops

    return peak_tflops(torch.device(o.device), o.peak_tflops)


# ---------------------------------------------------------------------------------------------------- tasks: set-up


def task_machine(o: BenchOptions) -> dict:
    import torch

    cuda = o.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise DitpipeError("--device cuda, but torch sees no CUDA device")
    return {"device": o.device, "device_name": torch.cuda.get_device_name() if cuda else platform.processor() or
            platform.machine(), "cpu_count": usable_cpus(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "platform": platform.platform(), "peak_tflops": _peak_tflops(o)}


def task_prepare_vae(o: BenchOptions, path: str) -> dict:
    """A random-init autoencoder of the chosen shape, saved with save_pretrained (loaded later for real)."""
    from ditpipe.pipeline.codec import save_random_autoencoder

    return save_random_autoencoder(o.vae_shape, Path(path), sample_size=o.image_size)


def _photo(rng, w: int, h: int):
    """A photo-like RGB image: smooth gradients, a few filled shapes, sensor-like noise (realistic JPEG sizes)."""
    import numpy as np
    from PIL import Image, ImageDraw

    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    chans = []
    for _ in range(3):
        a, b, f = rng.uniform(-1, 1), rng.uniform(-1, 1), rng.uniform(0.005, 0.03)
        chans.append(127 + 60 * (a * x / w + b * y / h) + 40 * np.sin(f * (x * a + y * b) + rng.uniform(0, 6)))
    img = Image.fromarray(np.clip(np.stack(chans, -1), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 8))):
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        box = [x0, y0, x0 + rng.uniform(20, w / 2), y0 + rng.uniform(20, h / 2)]
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.integers(2) else draw.rectangle)(box, fill=fill)
    arr = np.asarray(img).astype(np.int16) + rng.normal(0, 6, (h, w, 3)).astype(np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def task_prepare_jpegs(o: BenchOptions, folder: str, count: int) -> dict:
    import numpy as np

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(o.seed)
    total = 0
    for i in range(count):
        path = out / f"img{i:06d}.jpg"
        _photo(rng, o.jpeg_width, o.jpeg_height).save(path, "JPEG", quality=90)
        total += path.stat().st_size
    return {"count": count, "mean_bytes": total / max(count, 1)}


class _StandInSource:
    """What `manifest.manifest_header` reads from a source, for shards written directly (no encode run)."""

    def __init__(self, n: int, image_size: int, dataset: str):
        self.image_size, self.n = image_size, n
        self.params = {"dataset": dataset, "num_samples": n, "image_size": image_size, "crop": "synthetic (bench)"}
        self.class_names = [f"class{i}" for i in range(NUM_CLASSES)]
        self.items: list = []

    def __len__(self) -> int:
        return self.n


class _StandInVae:
    """The codec section of a manifest for synthetic VAE latents (named like the bench VAE, so the train stage's
    manifest check accepts them for that VAE)."""

    stores_std, downsample, latent_channels = True, 8, 4

    def __init__(self, name: str):
        self.name = name

    def identity(self) -> dict:
        return {"kind": "vae", "name": self.name, "hash": "bench-synthetic-latents", "dtype": "fp32",
                "scaling_factor": 0.18215, "shift_factor": 0.0, "downsample": 8, "latent_channels": 4}


def _targets_section(latent_shape: tuple[int, ...], dim: int, model_patch: int, mirror: bool):
    """A manifest `targets` section (as pipeline/encode.py writes one) for random stand-in targets of `dim` values a
    DiT token on the latent's grid at `model_patch`, no class token, fp16; and their Layout."""
    from ditpipe.pipeline.targets import RECORD, Layout

    side = latent_shape[-1] // model_patch
    slices = ["target", "target_flip"] if mirror else ["target"]
    layout = Layout(len(slices), side * side, dim, "fp16")
    encoder = {"kind": "bench", "name": "bench-synthetic-targets", "source": "random (bench)", "class": "none",
               "hash": "bench-synthetic-targets", "layer": "none", "dim": dim, "patch": 14,
               "normalize": None, "resize": None, "dtype": "float32"}
    section = {"encoder": encoder, "model_patch": model_patch, "class_token": False, "slices": slices,
               "dtype": "fp16", "grid": [side, side], "resolution": [side * 14, side * 14],
               "bytes_per_sample": layout.data_bytes, "record": RECORD}
    return section, layout


def _write_synthetic(folders: dict[str, str], n: int, image_size: int, codec_kind: str, codec_name: str,
                     dataset: str, spp: int, seed: int, npy: str | None = None, target_dim: int = 0,
                     model_patch: int = 0) -> dict:
    """The same n synthetic samples as tar and/or Parquet shards ({fmt: folder}) through the real ShardWriter and
    build_manifest, and optionally fast-DiT's layout (npy/features/<g>.npy + npy/labels/<g>.npy). `target_dim`:
    each sample also carries random REPA targets of that width on the grid of `model_patch` (with the mirror's
    when the latents store their flips, as encode --targets writes them)."""
    import numpy as np

    from ditpipe.pipeline import atomic, shards
    from ditpipe.pipeline.codec import PixelCodec

    codec = PixelCodec() if codec_kind == "pixel" else _StandInVae(codec_name)
    source = _StandInSource(n, image_size, dataset)
    slices = shards.latent_slices(codec.stores_std, "mean_std", True)
    shape = (len(slices), codec.latent_channels, image_size // codec.downsample, image_size // codec.downsample)
    section, layout = _targets_section(shape, target_dim, model_patch, "mean_flip" in slices) if target_dim \
        else (None, None)
    header = manifest_header(source, codec, spp, slices, flip_at_load=not codec.stores_std, targets=section)
    shape = tuple(header["latent"]["shape"])
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal((97, *shape), dtype=np.float32)  # content does not matter for speed; bytes do
    if codec.stores_std:
        for i, name in enumerate(slices):
            if name.startswith("std"):
                pool[:, i] = np.abs(pool[:, i]) * 0.1
    else:
        pool = np.tanh(pool)
    pool = pool.astype(np.float16)
    target_pool = None if layout is None else rng.standard_normal(  # (7, m, T, D): the bytes are what matter
        (7, *layout.shape), dtype=np.float32).astype(np.float16)
    labels = rng.integers(0, NUM_CLASSES, n)
    num_shards = max(1, math.ceil(n / spp))
    for fmt, folder in folders.items():
        Path(folder).mkdir(parents=True, exist_ok=True)
    if npy:
        for sub in ("features", "labels"):
            (Path(npy) / sub).mkdir(parents=True, exist_ok=True)
    for s in range(num_shards):
        start, stop = s * spp, min((s + 1) * spp, n)
        writers = {fmt: shards.ShardWriter(Path(folder) / shards.shard_name(fmt, s), fmt, shape, target=layout)
                   for fmt, folder in folders.items()}
        first = pool[np.arange(start, stop) % len(pool), 0].astype(np.float64)  # (n, C, H, W)
        side = {"inputs": [start, stop], "skipped": [], "converted": [], "sum": first.sum(axis=(0, 2, 3)).tolist(),
                "sumsq": np.square(first).sum(axis=(0, 2, 3)).tolist(),
                "count_px": int(first.shape[0] * first.shape[2] * first.shape[3])}
        for g in range(start, stop):
            latent, label = pool[g % len(pool)].copy(), int(labels[g])
            # Every sample unique, as in real data: Parquet's dictionary encoding must find no repeats to exploit.
            latent.reshape(-1)[:3] = [g % 2039, g // 2039 % 2039, g // 2039**2]
            meta = {"key": f"{g:08d}", "index": g, "file": f"synthetic:{g}", "label": label,
                    "class_name": f"class{label}"}
            target = None if target_pool is None else target_pool[g % len(target_pool)]  # (m, T, D) float16
            for w in writers.values():
                w.add(meta["key"], latent, meta, target=target)
            if npy:
                np.save(Path(npy) / "features" / f"{g}.npy", latent)
                np.save(Path(npy) / "labels" / f"{g}.npy", np.array([label], dtype=np.int64))
        for w in writers.values():
            w.close(side)
    for fmt, folder in folders.items():
        atomic.write_json(Path(folder) / shards.MANIFEST, build_manifest(Path(folder), header, num_shards, fmt))
    return {"samples": n, "shape": list(shape), "shards": num_shards}


def task_prepare_shards(o: BenchOptions, folders: dict, n: int, image_size: int, codec_kind: str,
                        codec_name: str = "", spp: int = 1000, npy: str | None = None, target_dim: int = 0,
                        model_patch: int = 0) -> dict:
    return _write_synthetic(folders, n, image_size, codec_kind, codec_name, "shapes", spp, o.seed, npy, target_dim,
                            model_patch)


# ---------------------------------------------------------------------------------------------------- encode


def _encode_config(o: BenchOptions, vae_dir: str, images_dir: str, out: str):
    from ditpipe.pipeline.config import load_config

    over = {"data.image_size": o.image_size, "data.num_samples": o.encode_images, "vae.name": vae_dir,
            "vae.dtype": o.vae_dtype, "vae.batch_size": o.encode_batch, "shards.path": out,
            "data.num_workers": o.num_workers}
    if o.encode_source == "jpeg":
        over.update({"data.dataset_name": "custom", "data.dataset_path": images_dir})
    else:
        over.update({"data.dataset_name": "shapes"})
    return load_config(None, over)


def _steady(stamps: list[tuple[float, int]]) -> tuple[int, float]:
    """(images, seconds) after the first batch (which pays one-off set-up: kernels, caches, first decodes), from
    per-batch completion stamps (time, images); the whole span when there is one batch."""
    if len(stamps) < 2:
        return (stamps[0][1], stamps[0][0]) if stamps else (0, 0.0)
    return sum(n for _, n in stamps[1:]), stamps[-1][0] - stamps[0][0]


def task_encode_pipeline(o: BenchOptions, vae_dir: str, images_dir: str, out: str) -> dict:
    """The real encode stage, with a completion stamp after each batch (encode's `on_batch` callback)."""
    from rich.console import Console

    from ditpipe.stages.encode import encode

    cfg = _encode_config(o, vae_dir, images_dir, out)
    stamps: list[tuple[float, int]] = []  # each after the batch's latents are handed on: the device work is queued
    t0 = time.perf_counter()
    manifest = Manifest.of(encode(cfg, console=Console(stderr=True),
                                  on_batch=lambda n: stamps.append((time.perf_counter(), n))))
    seconds = time.perf_counter() - t0
    images, steady_s = _steady(stamps)
    return {"images": manifest.num_samples, "seconds": seconds, "steady_images": images, "steady_s": steady_s,
            "workers": min(cfg.data.num_workers, usable_cpus()),
            "bytes": sum(s["bytes"] for s in manifest.entries)}


def bare_codec(o: BenchOptions, vae_dir: str):
    """The bare VAE, loaded and tuned as the encode stage loads and tunes its own (channels_last and cuDNN's timed
    kernels on CUDA, at encode's default vae.cudnn_benchmark), so the bare rate is the one encode could reach."""
    import torch

    from ditpipe.pipeline.codec import load_codec, tune_for_device
    from ditpipe.pipeline.config import VaeConfig

    codec = load_codec(vae_dir, o.vae_dtype, device=torch.device(o.device))
    tune_for_device(codec, VaeConfig().cudnn_benchmark)
    return codec


def task_encode_bare(o: BenchOptions, vae_dir: str) -> dict:
    """The VAE forwards alone, as the encode stage runs them: per batch of B images, the images and their mirrors
    (2B), in chunks of B (encode_with_backoff's batch), inputs already on the device; the same number of images."""
    import diffusers  # noqa: F401  (imported before the load is timed)
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    device = torch.device(o.device)
    t0 = time.perf_counter()
    codec = bare_codec(o, vae_dir)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    codec.weights_hash()
    hash_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(o.seed)
    b, s = o.encode_batch, o.image_size
    pixels = torch.randint(0, 256, (b, s, s, 3), dtype=torch.uint8, generator=g)
    both = torch.cat([pixels, pixels.flip(2)])
    x = (both.permute(0, 3, 1, 2).float() / 127.5 - 1).to(device, codec.dtype)  # (2B, 3, S, S)
    sizes = [b] * (o.encode_images // b) + ([o.encode_images % b] if o.encode_images % b else [])

    def forwards(n: int) -> None:
        for chunk in (x[:n], x[b : b + n]):  # the images, then their mirrors
            codec.forward(chunk)  # the encoder and its (mean, std) or latent, as the encode stage takes them

    _say(f"bare VAE: {o.encode_images} images × 2 forwards at batch {b}")
    stamps = []
    t0 = time.perf_counter()
    for n in sizes:
        forwards(n)
        _sync(device)
        stamps.append((time.perf_counter(), n))
    seconds = time.perf_counter() - t0
    images, steady_s = _steady(stamps)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        codec.vae.encode(x[:1])
    return {"images": o.encode_images, "seconds": seconds, "steady_images": images, "steady_s": steady_s,
            "load_s": load_s, "hash_s": hash_s, "encoder_gflops_per_image": counter.get_total_flops() / 1e9}


def task_jpeg_decode(o: BenchOptions, images_dir: str) -> dict:
    """Decode + ADM center crop, from bytes in memory, one process: with PIL's draft mode (what sources.load_image
    does) and without; also the real `load_image` (file read, sha256, EXIF check, draft, crop)."""
    import io

    from PIL import Image

    from ditpipe.pipeline.sources import center_crop, load_image, to_rgb

    files = sorted(Path(images_dir).glob("*.jpg"))[: o.jpeg_count]
    blobs = [f.read_bytes() for f in files]
    size = o.image_size

    def decode(data: bytes, draft: bool):
        img = Image.open(io.BytesIO(data))
        if draft:
            img.draft("RGB", (size, size))
        img.load()
        decoded = img.size
        center_crop(to_rgb(img, []), size, [])
        return decoded

    times = {"draft": [], "full": [], "load_image": []}
    for f, data in zip(files, blobs):  # warm: file cache, PIL's decoder set-up
        decode(data, True), decode(data, False), load_image(f, size)
    for _ in range(o.repeats):
        for kind in times:
            t0 = time.perf_counter()
            for f, data in zip(files, blobs):
                if kind == "load_image":
                    load_image(f, size)
                else:
                    decode(data, kind == "draft")
            times[kind].append(time.perf_counter() - t0)
    rate = {k: len(blobs) / statistics.median(v) for k, v in times.items()}
    return {"count": len(blobs), "size": [o.jpeg_width, o.jpeg_height], "image_size": size,
            "draft_images_per_s": rate["draft"], "full_images_per_s": rate["full"],
            "draft_speedup": rate["draft"] / rate["full"], "draft_decoded_size": list(decode(blobs[0], True)),
            "load_image_images_per_s": rate["load_image"]}


def _prepare_vae(o: BenchOptions, work: Path) -> str:
    path = work / f"vae-{o.vae_shape}"
    if not (path / "config.json").is_file():
        _say(f"building the random-init '{o.vae_shape}' VAE → {path}")
        _child("prepare_vae", o, path=str(path))
    return str(path)


def _prepare_jpegs(o: BenchOptions, work: Path, count: int) -> str:
    folder = work / f"jpegs-{o.jpeg_width}x{o.jpeg_height}"
    have = len(list(folder.glob("*.jpg"))) if folder.is_dir() else 0
    if have < count:
        _say(f"writing {count} photo-like {o.jpeg_width}x{o.jpeg_height} JPEGs → {folder}")
        _child("prepare_jpegs", o, folder=str(folder), count=count)
    return str(folder)


def _part_encode(o: BenchOptions, work: Path) -> dict:
    import shutil

    vae_dir = _prepare_vae(o, work)
    images = _prepare_jpegs(o, work, max(o.jpeg_count, o.encode_images if o.encode_source == "jpeg" else 0))
    out = work / "encode-out"
    shutil.rmtree(out, ignore_errors=True)
    _say(f"encode stage: {o.encode_images} {o.encode_source} images at {o.image_size}px, VAE {o.vae_shape} "
         f"{o.vae_dtype}, batch {o.encode_batch}")
    pipe = _child("encode_pipeline", o, vae_dir=vae_dir, images_dir=images, out=str(out))
    shutil.rmtree(out, ignore_errors=True)
    bare = _child("encode_bare", o, vae_dir=vae_dir)
    _say("JPEG decode with and without draft mode")
    jpeg = _child("jpeg_decode", o, images_dir=images)
    p_rate, b_rate = _rate(pipe["steady_images"], pipe["steady_s"]), _rate(bare["steady_images"], bare["steady_s"])
    return {"vae_shape": o.vae_shape, "vae_dtype": o.vae_dtype, "image_size": o.image_size,
            "batch_size": o.encode_batch, "images": pipe["images"], "source": o.encode_source,
            "num_workers": pipe["workers"], "forwards_per_image": 2, "timed_images": pipe["steady_images"],
            "pipeline_images_per_s": _r(p_rate), "pipeline_s": _r(pipe["steady_s"], 3),
            "bare_images_per_s": _r(b_rate), "bare_s": _r(bare["steady_s"], 3), "ratio": _r(_ratio(p_rate, b_rate)),
            "pipeline_end_to_end_images_per_s": _r(_rate(pipe["images"], pipe["seconds"])),
            "pipeline_end_to_end_s": _r(pipe["seconds"], 3), "shard_bytes": pipe["bytes"],
            "vae_load_s": _r(bare["load_s"], 3), "vae_hash_s": _r(bare["hash_s"], 3),
            "vae_encoder_gflops_per_image": _r(bare["encoder_gflops_per_image"], 2),
            "jpeg": {k: _r(v, 2) if isinstance(v, float) else v for k, v in jpeg.items()}}


# ---------------------------------------------------------------------------------------------------- loader


class NpyStore:
    """fast-DiT's layout: `features/<g>.npy` and `labels/<g>.npy` per sample, read with `np.load` as fast-DiT's
    dataset does. Quacks like ShardStore (`manifest`, `counts`, `shape_of`, `read`, `gather`), so the same
    MicroBatches does the rest: a file a sample, as fast-DiT reads them."""

    def __init__(self, folder: str, manifest: Manifest):
        self.folder, self.manifest = Path(folder), manifest
        self.counts = [s["samples"] for s in manifest.entries]
        self.text = None

    def shape_of(self, g: int) -> tuple[int, ...]:
        return tuple(self.manifest.latent["shape"])

    def read(self, g: int):
        import numpy as np

        latent = np.load(self.folder / "features" / f"{g}.npy")
        label = np.load(self.folder / "labels" / f"{g}.npy")
        return latent, int(label[0])

    def gather(self, indices, picks):
        import numpy as np

        labels = np.empty(len(indices), dtype=np.int64)
        for j, g in enumerate(indices.tolist()):
            latent, labels[j] = self.read(g)
            for slices, out in picks:
                out[j] = latent[slices[j]]
        return labels


def _loader_dataset(kind: str, folders: dict, seed: int, batch: int):
    from ditpipe.pipeline.config import DataConfig
    from ditpipe.pipeline.loader import MicroBatches
    from ditpipe.pipeline.order import EpochOrder, Plan
    from ditpipe.pipeline.store import open_shards

    store, manifest = open_shards(folders["wds" if kind == "npy" else kind])  # npy: the tar set's manifest
    if kind == "npy":
        store = NpyStore(folders["npy"], manifest)
    plan = Plan(manifest.num_samples, batch, 1, 1)
    order = EpochOrder(store.counts, seed, DataConfig().shuffle_window)
    return MicroBatches(store, order, plan, 0, seed), plan


def task_loader_rates(o: BenchOptions, folders: dict) -> dict:
    """Training-ready samples/s of tar, Parquet and per-file npy through make_loader; trials rotate the readers.
    Each trial: build the loader, one warm pass (workers start, page cache fills), then time a second pass."""
    import numpy as np

    from ditpipe.pipeline.loader import LatentView, make_loader, sample_normal
    from ditpipe.pipeline.order import sample_key

    kinds = ["tar", "parquet", "npy"]
    trials: dict[str, list[float]] = {k: [] for k in kinds}
    cpu_us: dict[str, list[float]] = {k: [] for k in kinds}  # CPU of this process and its workers, a sample
    for rep in range(o.repeats):
        for kind in kinds[rep % 3:] + kinds[: rep % 3]:
            ds, plan = _loader_dataset({"tar": "wds"}.get(kind, kind), folders, o.seed, o.loader_batch)
            loader = make_loader(ds, plan, 0, plan.steps_per_epoch, o.num_workers)
            for _ in loader:  # warm pass
                pass
            pids = [w.pid for w in getattr(loader._iterator, "_workers", [])] if o.num_workers else []
            cpu0 = _cpu_seconds(pids)
            n, t0 = 0, time.perf_counter()
            for batch in loader:
                n += len(batch["mean"])
            seconds = time.perf_counter() - t0
            cpu1 = _cpu_seconds(pids)
            trials[kind].append(n / seconds)
            if cpu0 is not None and cpu1 is not None:
                cpu_us[kind].append((cpu1 - cpu0) / n * 1e6)
            _say(f"loader {kind}: {n / seconds:,.0f} samples/s (trial {rep + 1}/{o.repeats})")
            del loader
    # Per-sample CPU costs in one process (process time: what the rates divide over the cores), to explain them.
    us: dict[str, float] = {}
    for kind in kinds:
        # As the loader's workers run: batch q on worker q mod W, each with its own store, from a cold start (every
        # worker opens every shard of a window it reads from), one epoch.
        workers = max(1, o.num_workers)
        sets = [_loader_dataset({"tar": "wds"}.get(kind, kind), folders, o.seed, o.loader_batch) for _ in
                range(workers)]
        plan = sets[0][1]
        t0 = time.process_time()
        for q in range(plan.micro_per_epoch):
            sets[q % workers][0][(1, q)]
        us[f"worker_{kind}"] = (time.process_time() - t0) / (plan.micro_per_epoch * o.loader_batch) * 1e6
        # Steady state: the same batches again, shards open (the per-sample work alone).
        ds = sets[0][0]
        q_count = min(plan.micro_per_epoch, max(1, 2048 // o.loader_batch))
        for q in range(q_count):
            ds[(2, q)]
        t0 = time.process_time()
        for q in range(q_count):
            ds[(2, q)]
        us[f"microbatch_{kind}"] = (time.process_time() - t0) / (q_count * o.loader_batch) * 1e6
        # The read alone, within the open shards of one window.
        idx = ds.order(2, np.arange(min(q_count * o.loader_batch, plan.num_samples)))
        for g in idx:
            ds.store.read(int(g))
        t0 = time.process_time()
        for g in idx:
            ds.store.read(int(g))
        us[f"read_{kind}"] = (time.process_time() - t0) / len(idx) * 1e6
        if kind == "tar":
            view, stored = LatentView(ds.store.manifest), ds.store.read(0)[0]
            t0 = time.process_time()
            keys = [sample_key(o.seed, 0, int(g)) for g in idx]
            us["sample_key"] = (time.process_time() - t0) / len(idx) * 1e6
            shape = stored.shape[1:]
            t0 = time.process_time()
            for key in keys:  # no longer the loader's: the step draws ε on the device (kept for comparison)
                sample_normal(key, shape, view.generator)
            us["eps_draw"] = (time.process_time() - t0) / len(idx) * 1e6
            t0 = time.process_time()
            for key in keys:
                view.select(stored, key)
            us["latent_view"] = (time.process_time() - t0) / len(idx) * 1e6
        del sets, ds
    return {"trials": trials, "per_sample_us": us, "loader_cpu_us": cpu_us}


def _part_loader(o: BenchOptions, work: Path) -> dict:
    if o.shards:
        return _part_loader_remote(o, work)
    base = work / f"loader-{o.loader_samples}"
    folders = {"wds": str(base / "wds"), "parquet": str(base / "parquet"), "npy": str(base / "npy")}
    latent = o.image_size // 8
    if not (base / "done").is_file():
        _say(f"writing {o.loader_samples:,} samples (4×4×{latent}×{latent} fp16) as tar, Parquet and per-file npy")
        _child("prepare_shards", o, folders={"wds": folders["wds"], "parquet": folders["parquet"]},
               n=o.loader_samples, image_size=o.image_size, codec_kind="vae", codec_name="bench-synthetic",
               npy=folders["npy"])
        (base / "done").write_text("ok\n")
    res = _child("loader_rates", o, folders=folders)
    med = {k: statistics.median(v) for k, v in res["trials"].items()}
    cores = usable_cpus()
    us = res["per_sample_us"]
    return {"samples": o.loader_samples, "sample_shape": [4, 4, latent, latent], "batch_size": o.loader_batch,
            "num_workers": o.num_workers, "repeats": o.repeats,
            "tar_samples_per_s": _r(med["tar"], 1), "parquet_samples_per_s": _r(med["parquet"], 1),
            "npy_samples_per_s": _r(med["npy"], 1), "tar_over_npy": _r(_ratio(med["tar"], med["npy"]), 3),
            "parquet_over_npy": _r(_ratio(med["parquet"], med["npy"]), 3),
            "trials": {k: [_r(x, 1) for x in v] for k, v in res["trials"].items()},
            "per_sample_us": {k: _r(v, 2) for k, v in us.items()},
            "cpu_ceiling_samples_per_s": {k: _r(cores * 1e6 / us[f"worker_{k}"], 1)
                                          for k in ("tar", "parquet", "npy")},
            "loader_cpu_us_per_sample": {k: _r(statistics.median(v), 2) if v else None
                                         for k, v in res["loader_cpu_us"].items()},
            "cpu_bound_samples_per_s": {k: _r(cores * 1e6 / statistics.median(v), 1) if v else None
                                        for k, v in res["loader_cpu_us"].items()},
            "eps_ceiling_samples_per_s": _r(cores * 1e6 / us["eps_draw"], 1)}


def _copy_shards(url: str, local: Path) -> None:
    """The shard folder at `url` downloaded whole into `local` (every file its manifest lists, the manifest last),
    checked as any local folder is when opened."""
    from ditpipe.pipeline import objstore, remote, shards

    manifest = remote.load_url_manifest(url)
    local.mkdir(parents=True, exist_ok=True)
    names = [n for entry in manifest.entries for n in (entry["name"], entry["sidecar"])] + [shards.MANIFEST]
    for name in names:
        objstore.get_file(remote.url_join(url, name), local / f".{name}.tmp")
        (local / f".{name}.tmp").rename(local / name)


def task_loader_remote(o: BenchOptions, url: str, local: str, cache_dir: str) -> dict:
    """Samples/s of one training epoch through make_loader (MicroBatches, o.num_workers workers), the same shards
    three ways: the local copy, the URL with an empty shard cache (cold: every shard downloaded, fetched ahead by
    the prefetcher), and the URL again with the cache full (warm). Each pass is a fresh loader, timed from its
    creation to its last batch (worker start-up included, for all three alike; opening the folder, which reads the
    manifest once a run, is timed apart); trials repeat cold, warm, local, and warm and local each time a second
    pass after an untimed one (whatever the cold pass leaves settling, it settles then)."""
    import shutil

    from ditpipe.pipeline.config import DataConfig, StorageConfig
    from ditpipe.pipeline.loader import MicroBatches, make_loader
    from ditpipe.pipeline.order import EpochOrder, Plan
    from ditpipe.pipeline.store import open_shards

    storage = StorageConfig(cache_dir=cache_dir)
    trials: dict[str, list[float]] = {"local": [], "cold": [], "warm": []}
    opens: dict[str, list[float]] = {"local": [], "cold": [], "warm": []}
    shard_bytes = 0
    for rep in range(o.repeats):
        for kind, timed in (("cold", True), ("warm", False), ("warm", True), ("local", False), ("local", True)):
            if kind == "cold":
                shutil.rmtree(Path(cache_dir), ignore_errors=True)  # the bench's own folder under its workdir
            t0 = time.perf_counter()
            store, manifest = open_shards(local if kind == "local" else url, storage)
            opens[kind].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            plan = Plan(manifest.num_samples, o.loader_batch, 1, 1)
            ds = MicroBatches(store, EpochOrder(store.counts, o.seed, DataConfig().shuffle_window), plan, 0, o.seed)
            n = sum(len(batch["mean"]) for batch in make_loader(ds, plan, 0, plan.steps_per_epoch, o.num_workers))
            seconds = time.perf_counter() - t0
            if not timed:
                continue
            trials[kind].append(n / seconds)
            shard_bytes = sum(int(e["bytes"]) for e in manifest.entries)
            _say(f"loader {kind}: {n / seconds:,.0f} samples/s ({n:,} samples in {seconds:.2f} s; trial "
                 f"{rep + 1}/{o.repeats})")
    return {"trials": trials, "open_s": opens, "samples": n, "shard_bytes": shard_bytes,
            "num_samples": manifest.num_samples,
            "num_shards": len(manifest.entries), "prefetch_shards": storage.prefetch_shards}


def _part_loader_remote(o: BenchOptions, work: Path) -> dict:
    """bench loader --shards URL: the same run over the same shards on local disk, from the URL cold and warm."""
    from ditpipe.pipeline import cache, remote

    remote.check_location(o.shards)
    local = work / "remote-copy" / cache.folder_digest(o.shards)
    if not (local / "manifest.json").is_file():
        _say(f"copying {o.shards} to {local} (the local-disk baseline)")
        _copy_shards(o.shards, local)
    res = _child("loader_remote", o, url=o.shards, local=str(local), cache_dir=str(work / "remote-cache"))
    med = {k: statistics.median(v) for k, v in res["trials"].items()}
    return {"shards": o.shards, "samples": res["samples"], "num_shards": res["num_shards"],
            "shard_bytes": res["shard_bytes"], "batch_size": o.loader_batch, "num_workers": o.num_workers,
            "repeats": o.repeats,
            "remote": {"local_samples_per_s": _r(med["local"], 1), "cold_samples_per_s": _r(med["cold"], 1),
                       "warm_samples_per_s": _r(med["warm"], 1), "cold_ratio": _r(_ratio(med["cold"], med["local"]), 3),
                       "warm_ratio": _r(_ratio(med["warm"], med["local"]), 3),
                       # bytes a second each pass moved: cold is bounded by what the object store serves
                       "mb_per_s": {k: _r(v * res["shard_bytes"] / res["num_samples"] / 1e6, 1)
                                    for k, v in med.items()},
                       "prefetch_shards": res["prefetch_shards"],
                       "open_s": {k: _r(statistics.median(v), 3) for k, v in res["open_s"].items()},
                       "trials": {k: [_r(x, 1) for x in v] for k, v in res["trials"].items()}}}


# ---------------------------------------------------------------------------------------------------- train


class _Trainer:
    """The training set-up of `ditpipe train`, built by the same code (pipeline/run.py: the accelerator, the data,
    the plan, the model and the `pipeline.step.Step`), and its step. Logging, checkpoints, validation and signals are
    left out; they do not run on most steps."""

    def __init__(self, o: BenchOptions, mode: str, shards_dir: str, vae_dir: str, workers: int, samples: int,
                 repa: bool = False):
        from ditpipe.pipeline.config import REPA_WEIGHT, load_config
        from ditpipe.pipeline.run import Stream, build_model_for, build_step_for, open_run

        self.o = o
        repa_keys = {"training.repa.weight": REPA_WEIGHT, "training.repa.projector_dim": o.repa_projector_dim} \
            if repa else {}  # the depth: training.repa.depth's default (REPA's 8)
        self.cfg = cfg = load_config(None, {
            "data.dataset_name": "shapes", "data.image_size": o.image_size, "data.num_samples": samples,
            "data.source": "images" if mode == "online" else "shards", "data.num_workers": workers,
            "shards.path": shards_dir, "vae.name": vae_dir, "vae.dtype": o.vae_dtype, "model.name": o.model,
            "model.compile": o.compile, "model.gradient_checkpointing": o.gradient_checkpointing,
            "training.batch_size": o.batch_size,
            "training.gradient_accumulation_steps": o.accum, "training.mixed_precision": o.precision,
            "training.seed": o.seed, "logging.tensorboard": False, **repa_keys})
        run = open_run(cfg, threads=False)  # the measuring process chose its threads as train does (_child_main)
        self.precision, self.device, self.latent_shape = run.precision, run.device, run.latent_shape
        self.manifest = run.manifest
        model, objective, _ = build_model_for(run)
        self.step_fn = build_step_for(run, model, objective)
        self.total_steps = 10**6
        self.stream = Stream(run, workers, end_step=self.total_steps)
        self.stream.start(0)
        self.step_index = 0

    def next_micro(self):
        return self.stream.next()

    def next_batch(self):
        """The next raw batch (images, for the online mode), not yet encoded."""
        return next(self.stream.batches)

    def to_latents(self, batch):
        return self.stream.posterior(batch)

    def step(self, feed=None) -> None:
        from ditpipe.pipeline.schedule import lr_at

        cfg, t = self.cfg, self.cfg.training
        lr = lr_at(self.step_index, t.learning_rate, cfg.lr_scheduler.type, cfg.lr_scheduler.warmup_steps,
                   self.total_steps)
        self.step_fn(self.step_index, lr, feed or self.next_micro)
        self.step_index += 1

    def step_flops(self, m) -> float:
        """FLOPs of one optimizer step (`accum` micro-batches like m), counted as `ditpipe train`'s closing MFU
        counts them (pipeline.step.train_flops_per_sample: 3 forwards, 4 with gradient checkpointing)."""
        from ditpipe.pipeline.step import train_flops_per_sample

        s = self.step_fn
        per_sample = train_flops_per_sample(s.raw, s.objective, m.mean.float(), m.y, s.conditional)
        return per_sample * len(m.mean) * s.plan.accum

    def close(self) -> None:
        self.stream.batches = None  # its workers stop


def task_train(o: BenchOptions, mode: str, shards_dir: str, vae_dir: str, samples: int, repa: bool = False) -> dict:
    """Steps/s of one mode through the loader; then, alone, the training step (precomputed) or the VAE encode of a
    batch (online); and their FLOPs. `repa`: the precomputed step with REPA's alignment (the shards' targets)."""
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    tr = _Trainer(o, mode, shards_dir, vae_dir, o.num_workers, samples, repa)
    sync = lambda: _sync(tr.device)  # noqa: E731
    mode = f"{mode} + REPA" if repa else mode
    _say(f"train {mode}: {o.model}, batch {o.batch_size}×{o.accum}, {tr.precision}; {o.warmup} warm-up step(s)")
    for _ in range(o.warmup):
        tr.step()
    sync()
    steps, seconds = _timed(tr.step, o.steps, o.min_seconds if mode != "online" else 0.0, sync, every=o.steps)
    _say(f"train {mode}: {steps / seconds:.3f} steps/s over {steps} steps")
    out = {"mode": mode, "steps": steps, "seconds": seconds, "precision": tr.precision,
           "latent_shape": list(tr.latent_shape)}
    if repa:  # what a sample stores, from the manifest the run trains on
        manifest, layout = tr.manifest, tr.manifest.target_layout()
        out.update({"latent_bytes_per_sample": int(np.prod(manifest.latent["shape"])) * 2,  # fp16, every slice
                    "target_bytes_per_sample": layout.data_bytes, "target_layout": [layout.slices, layout.tokens,
                                                                                   layout.dim],
                    "shard_bytes_per_sample": sum(e["bytes"] for e in manifest.entries) / manifest.num_samples,
                    "projector_params": sum(p.numel() for p in tr.step_fn.projector.parameters()),
                    "repa_depth": tr.cfg.training.repa.depth})
    if mode != "online":
        m = tr.next_micro()
        n, secs = _timed(lambda: tr.step(lambda: m), max(2, o.steps), o.min_seconds, sync, every=max(2, o.steps))
        out["t_step_s"] = secs / n
        out["dit_flops_per_step"] = tr.step_flops(m)
    else:
        pixels_batch = tr.next_batch()
        with torch.no_grad():
            tr.to_latents(pixels_batch)  # warm
            sync()
            n, secs = _timed(lambda: tr.to_latents(pixels_batch), 2, 0.0, sync)
            with FlopCounterMode(display=False) as counter:
                tr.to_latents(pixels_batch)
        out["t_vae_s"] = secs / n * o.accum  # a step encodes `accum` micro-batches
        out["vae_flops_per_step"] = counter.get_total_flops() * o.accum
    tr.close()
    return out


def _prepare_train_shards(o: BenchOptions, work: Path, vae_dir: str, samples: int) -> str:
    """The train and memory parts' shards; with --repa they also carry REPA's targets (every mode reads the same
    shards; only the REPA step reads the targets)."""
    from ditpipe.pipeline.model import DIT_PRESETS

    patch = DIT_PRESETS[o.model]["patch_size"]
    tail = f"-targets{o.repa_target_dim}p{patch}" if o.repa else ""
    folder = work / f"train-latents-{o.image_size}-{samples}{tail}"
    if not (folder / "manifest.json").is_file():
        _say(f"writing {samples} synthetic latents for {o.image_size}px" + (
            f" with {o.repa_target_dim}-d targets a token" if o.repa else "") + f" → {folder}")
        _child("prepare_shards", o, folders={"wds": str(folder)}, n=samples, image_size=o.image_size,
               codec_kind="vae", codec_name=str(Path(vae_dir).resolve()),
               target_dim=o.repa_target_dim if o.repa else 0, model_patch=patch)
    return str(folder)


def _train_samples(o: BenchOptions) -> int:
    return max(64, 2 * o.batch_size * o.accum)


def _part_train(o: BenchOptions, work: Path) -> dict:
    from ditpipe.pipeline.step import FLOPS_CONVENTION

    vae_dir = _prepare_vae(o, work)
    samples = _train_samples(o)
    shards_dir = _prepare_train_shards(o, work, vae_dir, samples)
    pre = _child("train", o, mode="precomputed", shards_dir=shards_dir, vae_dir=vae_dir, samples=samples)
    aligned = _child("train", o, mode="precomputed", shards_dir=shards_dir, vae_dir=vae_dir, samples=samples,
                     repa=True) if o.repa else None  # right after its baseline, on the same shards
    onl = _child("train", o, mode="online", shards_dir=shards_dir, vae_dir=vae_dir, samples=samples)
    peak = _child("machine", o)["peak_tflops"] if o.device == "cuda" or o.peak_tflops else None
    images_per_step = o.batch_size * o.accum
    res: dict = {"model": o.model, "vae_shape": o.vae_shape, "vae_dtype": o.vae_dtype, "image_size": o.image_size,
                 "latent_shape": pre["latent_shape"], "batch_size": o.batch_size, "accum": o.accum,
                 "precision": pre["precision"], "num_workers": o.num_workers, "compile": o.compile,
                 "gradient_checkpointing": o.gradient_checkpointing, "flops_convention": FLOPS_CONVENTION}
    rates = {}
    for name, r in (("precomputed", pre), ("online", onl)):
        sps = _rate(r["steps"], r["seconds"])
        rates[name] = sps
        res[name] = {"steps": r["steps"], "seconds": _r(r["seconds"], 3), "steps_per_s": _r(sps, 4),
                     "images_per_s": _r(sps * images_per_step, 3)}
    speedup = _ratio(rates["precomputed"], rates["online"])
    ideal = (pre["t_step_s"] + onl["t_vae_s"]) / pre["t_step_s"]
    dit, vae = pre["dit_flops_per_step"], onl["vae_flops_per_step"]
    res.update({"speedup": _r(speedup, 3), "t_step_s": _r(pre["t_step_s"], 4), "t_vae_s": _r(onl["t_vae_s"], 4),
                "ideal_ratio": _r(ideal, 3), "achieved_fraction": _r(_ratio(speedup, ideal), 4),
                "dit_gflops_per_step": _r(dit / 1e9, 2), "vae_gflops_per_step": _r(vae / 1e9, 2),
                "peak_tflops": peak,
                "mfu_precomputed": _r(dit * rates["precomputed"] / (peak * 1e12), 4) if peak else None,
                "mfu_online": _r((dit + vae) * rates["online"] / (peak * 1e12), 4) if peak else None,
                "extrapolate": {"images": o.extrapolate_images,
                                "precomputed_s": _r(o.extrapolate_images / (rates["precomputed"] * images_per_step), 1),
                                "online_s": _r(o.extrapolate_images / (rates["online"] * images_per_step), 1)}})
    mfu = f"MFU {res['mfu_precomputed']:.1%} of {peak:g} TFLOP/s" if peak else "MFU n/a (no known peak)"
    _say(f"train {o.model}: {res['precomputed']['images_per_s']:,.1f} img/s precomputed, {mfu}; "
         f"{res['dit_gflops_per_step']:,.1f} GFLOP a step, {FLOPS_CONVENTION}")
    if aligned is not None:
        res["repa"] = _repa_summary(o, pre, aligned)
        r = res["repa"]
        _say(f"train {o.model} with REPA: {r['with']['images_per_s']:,.1f} img/s against "
             f"{r['without']['images_per_s']:,.1f} without (step × {r['step_seconds_ratio']}, the step alone × "
             f"{r['t_step_ratio']}); targets {r['target_bytes_per_sample'] / 1024:,.1f} KiB a sample, the latents "
             f"{r['latent_bytes_per_sample'] / 1024:,.1f} KiB")
    return res


def _repa_summary(o: BenchOptions, pre: dict, aligned: dict) -> dict:
    """The precomputed step without REPA (`pre`) and with it (`aligned`), on the same shards, in the same run:
    their costs, ratios (with / without) and the bytes a sample of latents and of targets."""
    from ditpipe.pipeline.config import REPA_WEIGHT
    from ditpipe.pipeline.model import DIT_PRESETS

    images_per_step = o.batch_size * o.accum
    rates, out = {}, {}
    for name, r in (("without", pre), ("with", aligned)):
        rates[name] = sps = _rate(r["steps"], r["seconds"])
        out[name] = {"steps": r["steps"], "seconds": _r(r["seconds"], 3), "steps_per_s": _r(sps, 4),
                     "images_per_s": _r(sps * images_per_step, 3), "step_seconds": _r(1 / sps, 5),
                     "t_step_s": _r(r["t_step_s"], 5)}
    slices, tokens, dim = aligned["target_layout"]
    hidden, p = DIT_PRESETS[o.model]["hidden_size"], o.repa_projector_dim
    # forward + backward = 3 forwards of its three matmuls (2 FLOPs a multiply-add), every image token of the step
    projector_flops = 3 * 2 * (hidden * p + p * p + p * dim) * tokens * images_per_step
    return {"weight": REPA_WEIGHT, "depth": aligned["repa_depth"], "projector_dim": p,
            "projector_params": aligned["projector_params"],
            "projector_gflops_per_step": _r(projector_flops / 1e9, 3),
            "target_dim": dim, "target_tokens": tokens, "target_slices": slices,
            "latent_bytes_per_sample": aligned["latent_bytes_per_sample"],
            "target_bytes_per_sample": aligned["target_bytes_per_sample"],
            "target_over_latent": _r(_ratio(aligned["target_bytes_per_sample"], aligned["latent_bytes_per_sample"]), 3),
            "shard_bytes_per_sample": _r(aligned["shard_bytes_per_sample"], 1),
            **out,
            "step_seconds_ratio": _r(_ratio(rates["without"], rates["with"]), 4),
            "t_step_ratio": _r(_ratio(aligned["t_step_s"], pre["t_step_s"]), 4),
            "images_per_s_ratio": _r(_ratio(rates["with"], rates["without"]), 4)}


# ---------------------------------------------------------------------------------------------------- memory


def task_train_memory(o: BenchOptions, mode: str, shards_dir: str, vae_dir: str, samples: int) -> dict:
    """A training process, DataLoader in-process (workers 0), `memory_steps` steps; its peak memory and whether it
    ever imported diffusers or built an AutoencoderKL."""
    import gc
    import warnings

    import torch

    tr = _Trainer(o, mode, shards_dir, vae_dir, 0, samples)
    for _ in range(o.memory_steps):
        tr.step()
    _sync(tr.device)
    imported = "diffusers" in sys.modules
    with warnings.catch_warnings():  # isinstance on every live object wakes deprecated module attributes
        warnings.simplefilter("ignore")
        constructed = imported and any(type(obj).__name__ == "AutoencoderKL" for obj in gc.get_objects()
                                       if isinstance(obj, torch.nn.Module))
    cuda_peak = torch.cuda.max_memory_allocated() / 2**20 if tr.device.type == "cuda" else None
    return {"peak_mib": _vm_hwm_mib(), "cuda_peak_mib": cuda_peak, "diffusers_imported": imported,
            "vae_constructed": constructed}


def task_loader_memory(o: BenchOptions, folder: str) -> dict:
    """Peak RSS while streaming through make_loader: this process and each worker. Both shard sets stream the same
    number of batches (`memory_large` samples' worth; epochs repeat over the small set), so every worker works in
    both and only the data set's size differs."""
    from ditpipe.pipeline.config import DataConfig
    from ditpipe.pipeline.loader import MicroBatches, make_loader
    from ditpipe.pipeline.order import EpochOrder, Plan
    from ditpipe.pipeline.store import open_shards

    store, manifest = open_shards(folder)
    plan = Plan(manifest.num_samples, o.loader_batch, 1, 1)
    ds = MicroBatches(store, EpochOrder(store.counts, o.seed, DataConfig().shuffle_window), plan, 0, o.seed)
    loader = make_loader(ds, plan, 0, max(1, o.memory_large // o.loader_batch), o.num_workers)
    it = iter(loader)
    n = 0
    for batch in it:
        n += len(batch["mean"])
    workers = [w.pid for w in getattr(it, "_workers", [])]  # persistent: still alive after the run
    peaks = [_vm_hwm_mib(pid) for pid in workers]
    main = _vm_hwm_mib()
    del it, loader
    return {"samples": manifest.num_samples, "streamed": n, "main_peak_mib": main,
            "workers_peak_mib": sum(p or 0 for p in peaks), "total_peak_mib": main + sum(p or 0 for p in peaks),
            "workers": len(workers)}


def _part_memory(o: BenchOptions, work: Path) -> dict:
    vae_dir = _prepare_vae(o, work)
    samples = _train_samples(o)
    shards_dir = _prepare_train_shards(o, work, vae_dir, samples)
    train = {"steps": o.memory_steps, "batch_size": o.batch_size}
    for mode in ("precomputed", "online"):
        _say(f"memory: training process, {mode}")
        train[mode] = {k: _r(v, 1) if isinstance(v, float) else v for k, v in
                       _child("train_memory", o, mode=mode, shards_dir=shards_dir, vae_dir=vae_dir,
                              samples=samples).items()}
    key = "cuda_peak_mib" if o.device == "cuda" else "peak_mib"
    train["online_over_precomputed"] = _r(_ratio(train["online"][key], train["precomputed"][key]), 3)
    loader = {"image_size": o.memory_image_size, "batch_size": o.loader_batch, "num_workers": o.num_workers,
              "small_samples": o.memory_small, "large_samples": o.memory_large}
    for fmt in ("wds", "parquet"):
        loader[fmt] = {}
        for size_name, n in (("small", o.memory_small), ("large", o.memory_large)):
            folder = work / f"pixel-{o.memory_image_size}px-{n}-{fmt}"
            if not (folder / "manifest.json").is_file():
                _say(f"memory: writing {n:,} pixel-codec samples at {o.memory_image_size}px ({fmt}) → {folder}")
                _child("prepare_shards", o, folders={fmt: str(folder)}, n=n, image_size=o.memory_image_size,
                       codec_kind="pixel")
            _say(f"memory: loader over {n:,} samples ({fmt})")
            loader[fmt][size_name] = {k: _r(v, 1) if isinstance(v, float) else v
                                      for k, v in _child("loader_memory", o, folder=str(folder)).items()}
        loader[fmt]["ratio"] = _r(_ratio(loader[fmt]["large"]["total_peak_mib"],
                                         loader[fmt]["small"]["total_peak_mib"]), 4)
        loader[fmt]["main_ratio"] = _r(_ratio(loader[fmt]["large"]["main_peak_mib"],
                                              loader[fmt]["small"]["main_peak_mib"]), 4)
    return {"train": train, "loader": loader}


# ---------------------------------------------------------------------------------------------------- targets


def targets(result: dict) -> list[dict]:
    """The project's performance targets (issue 8), checked against this run. `applies` says whether the run used
    the settings a target is stated for (e.g. the encode ratio is stated for the sd-shaped VAE at 256 px)."""
    out = []
    device = result["settings"]["device"]

    def add(name, part, target, value, met, applies):
        out.append({"name": name, "part": part, "target": target, "value": value,
                    "met": None if value is None else bool(met), "applies": bool(applies)})

    cpu = device == "cpu"
    if "encode" in result:
        e = result["encode"]
        add("encode ratio to the bare VAE", "encode", ">= 0.90", e["ratio"], (e["ratio"] or 0) >= 0.90,
            cpu and e["vae_shape"] == "sd" and e["image_size"] == 256)
    if "loader" in result and "remote" in result["loader"]:  # --shards URL: the cache's targets (issue 29)
        r = result["loader"]["remote"]
        add("loader from the URL, warm cache / local disk", "loader", ">= 0.95", r["warm_ratio"],
            (r["warm_ratio"] or 0) >= 0.95, cpu)
        add("loader from the URL, cold cache / local disk", "loader", ">= 0.80", r["cold_ratio"],
            (r["cold_ratio"] or 0) >= 0.80, cpu)
    elif "loader" in result:
        lo = result["loader"]
        stated = cpu and lo["sample_shape"] == [4, 4, 32, 32] and lo["num_workers"] == _default_workers()
        add("loader tar samples/s", "loader", ">= 25000", lo["tar_samples_per_s"], lo["tar_samples_per_s"] >= 25000,
            stated)
        add("loader Parquet samples/s", "loader", ">= 50000", lo["parquet_samples_per_s"],
            lo["parquet_samples_per_s"] >= 50000, stated)
        add("loader tar / per-file npy", "loader", ">= 2.5", lo["tar_over_npy"], (lo["tar_over_npy"] or 0) >= 2.5,
            stated)
        add("loader Parquet / per-file npy", "loader", ">= 2.5", lo["parquet_over_npy"],
            (lo["parquet_over_npy"] or 0) >= 2.5, stated)
    if "train" in result:
        tr = result["train"]
        add("train achieved fraction of the ideal speedup", "train", ">= 0.95", tr["achieved_fraction"],
            (tr["achieved_fraction"] or 0) >= 0.95,
            cpu and tr["model"] == "DiT-S/2" and tr["vae_shape"] == "sd" and tr["image_size"] == 256)
        if not cpu:
            add("train MFU, DiT-XL/2 precomputed", "train", ">= 0.50", tr["mfu_precomputed"],
                (tr["mfu_precomputed"] or 0) >= 0.5, tr["model"] == "DiT-XL/2" and tr["image_size"] == 256)
            add("50 epochs × 5,000 images, DiT-B/2, seconds", "train", "< 600", tr["extrapolate"]["precomputed_s"],
                (tr["extrapolate"]["precomputed_s"] or math.inf) < 600,
                tr["model"] == "DiT-B/2" and tr["image_size"] == 256 and tr["extrapolate"]["images"] == 250000)
    if "memory" in result:
        m = result["memory"]
        for fmt in ("wds", "parquet"):
            add(f"loader peak RSS, {m['loader']['large_samples']:,} vs {m['loader']['small_samples']:,} samples "
                f"({fmt})", "memory", "<= 1.05", m["loader"][fmt]["ratio"], (m["loader"][fmt]["ratio"] or 9) <= 1.05,
                m["loader"]["small_samples"] == 1000 and m["loader"]["large_samples"] == 100000)
        pre = m["train"]["precomputed"]
        add("precomputed training never holds VAE weights", "memory", "no diffusers import, no AutoencoderKL",
            not (pre["diffusers_imported"] or pre["vae_constructed"]),
            not (pre["diffusers_imported"] or pre["vae_constructed"]), True)
    return out


def _default_workers() -> int:
    from ditpipe.pipeline.config import DataConfig

    return DataConfig().num_workers


TASKS = {"machine": task_machine, "prepare_vae": task_prepare_vae, "prepare_jpegs": task_prepare_jpegs,
         "prepare_shards": task_prepare_shards, "encode_pipeline": task_encode_pipeline,
         "encode_bare": task_encode_bare, "jpeg_decode": task_jpeg_decode, "loader_rates": task_loader_rates,
         "loader_remote": task_loader_remote,
         "train": task_train, "train_memory": task_train_memory, "loader_memory": task_loader_memory}
