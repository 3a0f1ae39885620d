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
    from accelerate import Accelerator, PartialState

    cpu = not torch.cuda.is_available()
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before PartialState touches CUDA
    device = PartialState(cpu=cpu).device
    configure(device, tf32=tf32, deterministic=deterministic)
    precision, notice = effective_precision(requested_precision, device)
    return Accelerator(mixed_precision=precision, cpu=cpu), precision, notice


def describe(device: torch.device) -> str:
    """The device for the preflight: `cuda:0 (NVIDIA H200, 139.8 GiB)` or `cpu (16 threads)`."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{device} ({props.name}, {props.total_memory / 2**30:.1f} GiB)"
    return f"{device} ({torch.get_num_threads()} threads)"


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
