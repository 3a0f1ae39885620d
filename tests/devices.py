"""The GPU's rules, checked on a CPU: host reads counted at the dispatcher, and a run on a device that refuses CPU
tensors.

`HostReads` is a TorchDispatchMode: it sees every aten op a run makes, including those made inside C++ (a 0-dim
tensor turned into a Python number by an op's argument parser, as `_foreach_lerp_` does with its weight, is an
`aten._local_scalar_dense` there). It records each op that makes the host wait for a GPU, with the Python stack and
the training loop's `step` at that moment:
- value reads: `_local_scalar_dense` (`.item()`, `float()`, `bool()`, `if tensor:`), `is_nonzero`, `equal`;
- ops whose output size depends on the data (`nonzero`, `masked_select`, `unique`, boolean indexing) and ops whose
  CUDA kernels read a value back internally although they return device tensors (`nanmedian`, `median`), each of
  which syncs on CUDA and runs silently on a CPU;
- copies from the run's device to the host (`.cpu()`, `.tolist()`, `.to("cpu")`): visible where the device is not
  the CPU, i.e. under `on_meta`.

`on_meta` makes the Accelerator's device `meta`. Like CUDA, meta refuses a non-scalar CPU tensor in any op with its
tensors (elementwise ops, modules, `_foreach_*`), while a 0-dim CPU tensor passes, as on CUDA; a CPU-only torch has no
other device that behaves so (FakeTensorMode can make `cuda:0` tensors, but a module's `.to("cuda")` fails on a CPU
build, and no generator can be made for it). Meta tensors hold no values: `HostReads(serve=True)` answers each read
from meta with zeros so that a whole run, checkpoints and logs included, goes on, and records it. Autocast does not
exist for meta, so runs there are fp32 (`training.mixed_precision: no`); the CPU runs under `HostReads` cover bf16.
"""

from __future__ import annotations

import contextlib
import inspect
import traceback
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
READS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default}
DATA_SIZED = {aten.nonzero.default, aten.masked_select.default, aten._unique2.default, aten.unique_dim.default,
              aten.unique_consecutive.default, aten.repeat_interleave.Tensor}
CUDA_SYNCING = {aten.nanmedian.default, aten.median.default}  # one value read back inside the CUDA kernel
COPIES = {aten._to_copy.default, aten.copy_.default}
# Where a read is never allowed, whatever the step: inside the optimizer step and what the loop runs beside it.
IN_STEP = (("pipeline/step.py", "__call__"), ("pipeline/recovery.py", "update"), ("pipeline/ema.py", "update"),
           ("pipeline/phema.py", "update"), ("stages/train.py", "feed"))
SAMPLING = (("pipeline/diffusion.py", "_loop"), ("pipeline/diffusion.py", "_integrate"))


@dataclass
class Read:
    op: str
    step: int | None  # the training loop's `step` then (None outside `train`)
    within: tuple[str, ...]  # the IN_STEP / SAMPLING functions on the stack
    stack: str = field(repr=False)

    def __str__(self):
        return f"{self.op} at loop step {self.step} in {self.within or '-'}:\n{self.stack}"


class HostReads(TorchDispatchMode):
    """Records every host read (module docstring). `serve`: answer reads of meta tensors instead of failing, for
    runs under `on_meta`: copies with zeros, a value read with 0 (False), or with `serve(tensor, loop step)` where
    `serve` is a function (a test that needs the loop to see, say, non-finite steps)."""

    def __init__(self, serve=False):
        super().__init__()
        self.serve, self.reads = serve, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        src = args[1] if func is aten.copy_.default else args[0] if args else None
        meta = isinstance(src, torch.Tensor) and src.device.type == "meta"
        if func in READS or func in DATA_SIZED or func in CUDA_SYNCING:
            read = self._record(func)
            if meta and func is aten._local_scalar_dense.default and self.serve:
                value = self.serve(src, read.step) if callable(self.serve) else 0
                return bool(value) if src.dtype == torch.bool else value
        elif func is aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1]):
            self._record(func)  # boolean indexing: a nonzero inside the kernel
        elif func in COPIES and _to_host(func, args, kwargs):
            self._record(func)
            if meta and self.serve:
                if func is aten.copy_.default:
                    return args[0].zero_()
                return torch.zeros(src.shape, dtype=kwargs.get("dtype") or src.dtype)
        return func(*args, **kwargs)

    def _record(self, func) -> Read:
        frames = inspect.stack(context=0)[2:]
        within = tuple(f"{path}:{name}" for f in frames for path, name in IN_STEP + SAMPLING
                       if f.filename.endswith(path) and f.function == name)
        step = next((f.frame.f_locals.get("step") for f in frames
                     if f.function == "train" and f.filename.endswith("stages/train.py")), None)
        stack = "".join(traceback.format_list([(f.filename, f.lineno, f.function, f.code_context and f.code_context[0])
                                               for f in frames if "/torch/" not in f.filename][:8][::-1]))
        self.reads.append(Read(str(func), step, within, stack))
        return self.reads[-1]

    def between_log_steps(self, log_every: int, end_step: int) -> list[Read]:
        """The reads a training run must not make: any inside the step (or the loop's work beside it), and any in
        the loop at a step that is not a log step (`step` a multiple of `log_every`, or the end)."""
        in_step = {f"{path}:{name}" for path, name in IN_STEP}
        return [r for r in self.reads if in_step.intersection(r.within)
                or (r.step is not None and r.step % log_every and r.step != end_step)]

    def in_sampling_steps(self) -> list[Read]:
        """The reads made inside a sampler's loop: once per sampling step (or more), where none is needed."""
        sampling = {f"{path}:{name}" for path, name in SAMPLING}
        return [r for r in self.reads if sampling.intersection(r.within)]


def _to_host(func, args, kwargs) -> bool:
    """A copy from a non-CPU tensor to the CPU (on a CPU run every tensor is on the CPU: none is)."""
    if func is aten.copy_.default:
        return args[0].device.type == "cpu" and args[1].device.type != "cpu"
    target = kwargs.get("device")
    return args[0].device.type != "cpu" and target is not None and torch.device(target).type == "cpu"


@contextlib.contextmanager
def on_meta():
    """The Accelerator's device (and so the run's) is `meta` inside: train(), build_step and the samplers put every
    tensor they make there, and any CPU tensor that meets one raises as it would on CUDA."""
    from accelerate import PartialState
    from accelerate.state import AcceleratorState
    import torch.optim.optimizer as optimizer

    supported = optimizer._get_fused_kernels_supported_devices
    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState(cpu=True).device = torch.device("meta")
    # fused AdamW has meta kernels but torch's device list leaves meta out: the step needs the fused kernel
    optimizer._get_fused_kernels_supported_devices = lambda: [*supported(), "meta"]
    try:
        yield torch.device("meta")
    finally:
        optimizer._get_fused_kernels_supported_devices = supported
        AcceleratorState._reset_state(reset_partial_state=True)


if __name__ == "__main__":  # `torchrun … tests/devices.py OUT ARGS…`: `ditpipe ARGS…` under HostReads on each rank
    import json
    import os
    import sys

    from ditpipe.stages.cli import entry

    out, sys.argv = sys.argv[1], ["ditpipe", *sys.argv[2:]]
    mode = HostReads()
    try:
        with mode:
            entry()
    finally:
        with open(f"{out}.{os.environ.get('RANK', '0')}.json", "w") as f:
            json.dump([{"op": r.op, "step": r.step, "within": r.within, "stack": r.stack} for r in mode.reads], f)
