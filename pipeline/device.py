"""Devices, precision and speed settings: one place that every stage asks, so a run has one source of devices.

The Accelerator's device is the run's device. `make_accelerator` builds accelerate's process state first (which
calls `torch.cuda.set_device(LOCAL_RANK)` under torchrun, before any collective), resolves the precision for that
device, and only then makes the Accelerator. Nothing else in ditpipe picks a GPU.
"""

from __future__ import annotations

import os

import torch

# Dense bf16 tensor-core peaks, TFLOP/s (vendor datasheets, without sparsity). First match of the device name wins.
PEAK_BF16_TFLOPS = (("H200", 989.0), ("GH200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H800", 989.0),
                    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("RTX 4090", 165.2), ("V100", 125.0))


def bf16_native(device: torch.device) -> bool:
    """bf16 in hardware: on CUDA from Ampere on. `is_bf16_supported()` alone also counts emulation, which runs
    pre-Ampere GPUs in slow emulated bf16 instead of fp16 with loss scaling."""
    return device.type != "cuda" or torch.cuda.is_bf16_supported(including_emulation=False)


def effective_precision(requested: str, device: torch.device) -> tuple[str, str | None]:
    """training.mixed_precision as it can run on `device`, and a notice when that differs from what was asked."""
    if requested == "fp16" and device.type != "cuda":
        return "bf16", "fp16 autocast does not exist on CPU (accelerate would silently run fp32); using bf16"
    if requested == "bf16" and not bf16_native(device):
        return "fp16", "this GPU has no native bf16; using fp16 with loss scaling"
    return requested, None


def precision_advice(requested: str, device_type: str, native_bf16: bool) -> str | None:
    """What bf16 would save where fp16 was asked on a GPU that has bf16 in hardware (Ampere and later). fp16 stays
    the default (the training guide's, and the only fast choice before Ampere); the preflight says what the switch
    buys. `native_bf16`: bf16_native(device), passed in so the decision is a pure function."""
    if requested != "fp16" or device_type != "cuda" or not native_bf16:
        return None
    return ("this GPU has native bf16: training.mixed_precision bf16 runs at the same speed with no GradScaler "
            "(no loss scale to find, no steps skipped on an fp16 overflow); fp16 kept, as asked")


def configure(device: torch.device, *, tf32: bool = True, deterministic: bool = False) -> None:
    """Process-wide speed and reproducibility switches, set before the first CUDA kernel runs.

    tf32: fp32 matmuls and convolutions on tensor cores (Ampere and later; ~10 bits of mantissa, as the convolutions
    already do by default). deterministic: the same kernels and the same float sums every run, so a resumed CUDA
    run continues bit for bit; costs speed (cuBLAS needs a fixed workspace, some kernels fall back to slower ones)."""
    if deterministic:
        # Must be in the environment before cuBLAS makes its first handle; harmless on CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)  # process-wide: set either way, so one run's never leaks
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        torch.backends.cudnn.benchmark = False  # benchmarking picks kernels by timing: another run, other kernels
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32 and not deterministic
        torch.backends.cudnn.allow_tf32 = tf32 and not deterministic


def make_accelerator(requested_precision: str, *, tf32: bool = True, deterministic: bool = False):
    """(Accelerator, precision actually used, notice or None). The device comes from accelerate's process state
    (this rank's GPU under torchrun, else cuda:0, else the CPU); the precision is resolved for it."""
    from accelerate import Accelerator, DistributedDataParallelKwargs, PartialState

    from ditpipe.pipeline.spread import TIMEOUT

    cpu = not torch.cuda.is_available()
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before PartialState touches CUDA
    # PartialState creates the process group (the Accelerator reuses it, so its InitProcessGroupKwargs would come too
    # late). The long timeout: every rank waits in a collective while rank 0 alone computes the training-FID
    # reference statistics or checks a checkpoint; NCCL's default watchdog kills a wait of over 10 minutes.
    state = PartialState(cpu=cpu, timeout=TIMEOUT)
    device = state.device
    configure(device, tf32=tf32, deterministic=deterministic)
    precision, notice = effective_precision(requested_precision, device)
    if advice := precision_advice(precision, device.type, device.type == "cuda" and bf16_native(device)):
        notice = f"{notice}; {advice}" if notice else advice
    ddp = DistributedDataParallelKwargs(**ddp_options(deterministic, state.num_processes))
    return Accelerator(mixed_precision=precision, cpu=cpu, kwargs_handlers=[ddp]), precision, notice


def ddp_options(deterministic: bool, world: int) -> dict:
    """How DDP wraps the model (accelerate's defaults otherwise).

    gradient_as_bucket_view: each .grad is a view into DDP's all-reduce bucket, so there is no second model-sized
    copy of the gradients and no copy into and out of the buckets each step (safe here: the step zeroes with
    set_to_none and never detaches a gradient). static_graph stays off: it saves little without unused parameters
    or reentrant checkpointing (the model checkpoints with use_reentrant=False), is untested with compile, and it
    rebuilds the buckets after the first step as well (below).

    find_unused_parameters under training.deterministic on 3 or more processes: DDP rebuilds its buckets once, after
    the first step of each launch, in the order the gradients became ready, so a resumed run's first step reduces
    in another bucket layout than the uninterrupted run's same step did. The all-reduce's summation order depends
    on where a value sits in the buffer (ring chunks; NCCL also picks its algorithm by message size); with 2
    processes a + b = b + a exactly, with 3 or more the sums differ in the last bit and the resume is no longer
    bitwise. torch never rebuilds the buckets when find_unused_parameters is on (reducer.hpp,
    should_rebuild_buckets), so every step of every launch reduces in one layout. Its cost, one walk of the
    autograd graph per step, is paid only where bitwise resume was asked for."""
    return {"gradient_as_bucket_view": True, "find_unused_parameters": deterministic and world >= 3}


def generator(device: torch.device, seed: int) -> torch.Generator:
    """A seeded generator for draws made on `device`. The meta device, the test suite's stand-in for a GPU
    (tests/devices.py), has no generator of its own: a CPU one stands in (draws on meta are shapes, no values)."""
    device = torch.device(device)
    return torch.Generator(device="cpu" if device.type == "meta" else device).manual_seed(seed)


def describe(device: torch.device) -> str:
    """The device for the preflight: `cuda:0 (NVIDIA H200, 139.8 GiB)` or `cpu (16 threads)`."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{device} ({props.name}, {props.total_memory / 2**30:.1f} GiB)"
    threads = torch.get_num_threads()
    return f"{device} ({threads} thread{'s' if threads != 1 else ''})"


def peak_tflops(device: torch.device, override: float = 0.0) -> float | None:
    """The dense bf16 peak of `device` (TFLOP/s) for MFU, or None where unknown (CPUs, unlisted GPUs)."""
    if override:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key.lower() in name.lower()), None)


def autocast_bf16(device: torch.device, enabled: bool = True):
    """bf16 autocast for inference (sampling, evaluation, validation grids) on CUDA; a no-op elsewhere. 250-step
    sampling in fp32 is several times slower, and a DiT trained in mixed precision samples as well in bf16."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled and device.type == "cuda"
                          and bf16_native(device))


def leave_process_group() -> None:
    """Leave torch.distributed's process group, if this process joined one, and free it while the interpreter is
    still whole, so that gloo's threads (the group's `pt_gloo_runloop` workers and its transport's `gloo_tcp_loop`)
    are joined here. Left running into interpreter exit, they now and then abort a rank that finished its work
    (SIGABRT, "terminate called without an active exception"; pytorch/pytorch#190489).

    `destroy_process_group` alone does not free the group: `torch.distributed.nn.functional` (imported by
    torch._dynamo, which DDP imports after the group exists) captured it as the default argument of ten functions
    (`group=group.WORLD`, evaluated at import), so the group and its threads outlived it until interpreter exit."""
    import sys

    dist = sys.modules.get("torch.distributed")  # never imported (ditpipe --help): nothing to leave
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    world = getattr(dist.distributed_c10d, "_world", None)
    groups = list(getattr(world, "pg_map", None) or [dist.group.WORLD])  # every group this process made
    dist.destroy_process_group()
    _forget_captured_groups(groups)
    groups.clear()  # the last references: each group's destructor joins its threads now


def _forget_captured_groups(groups: list) -> None:
    """Replace each of `groups` where a function holds it as a default argument by None, the default a function
    gets when it is defined before any group exists (torch.distributed's own meaning: the default group)."""
    import gc
    import types

    ids = {id(g) for g in groups}
    for f in gc.get_objects():  # functions are tracked by gc; their default tuples (of untracked objects) are not
        if type(f) is not types.FunctionType:
            continue
        if f.__defaults__ and any(id(v) in ids for v in f.__defaults__):
            f.__defaults__ = tuple(None if id(v) in ids else v for v in f.__defaults__)
        if f.__kwdefaults__ and any(id(v) in ids for v in f.__kwdefaults__.values()):
            f.__kwdefaults__ = {k: None if id(v) in ids else v for k, v in f.__kwdefaults__.items()}
