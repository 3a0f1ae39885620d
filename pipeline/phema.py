"""Post-hoc EMA (EDM2: Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models",
section 3 and appendix C): track two power-function EMAs while training, store snapshots of them, and after
training reconstruct the EMA of any length from the snapshots by least squares.

A power-function EMA with exponent γ holds, at time t, the average of the weights θ(τ) seen so far under the
density p_t(τ) = (γ+1)·τ^γ / t^(γ+1) on [0, t]. Its width relative to t is
    σ_rel = sqrt((γ+1) / ((γ+2)² (γ+3)))                                              (EDM2 eq. 123)
and it is tracked with β_t = (1 − 1/t)^(γ+1), t = the updates applied so far (eq. 127). That recursion gives step
τ ≤ t the weight (τ^(γ+1) − (τ−1)^(γ+1)) / t^(γ+1), the integral of p_t over (τ−1, τ]: exact for weights that are
constant within a step. β_1 = 0, so the initial weights get no weight at all.

Time is counted in optimizer steps here; EDM2 counts training images. Nothing depends on the unit: β_t depends on
Δt/t only, and every inner product of two profiles scales as 1/t, which the solve and the normalisation of the
coefficients cancel. So steps and images (steps × global batch) give the same coefficients.

A snapshot holds the fp32 shadow of one tracked EMA at one step, as safetensors in the official DiT layout, with
`step` and `sigma_rel` in its metadata. The reconstruction at step N solves for the combination of every snapshot at
or before N whose profile is nearest (in L2 over τ) to the wanted profile, then sums the snapshots with it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ditpipe.pipeline.atomic import TMP_SUFFIX, atomic_path, new_file_mode
from ditpipe.pipeline.config import POSTHOC_MAX_SIGMA_REL as MAX_SIGMA_REL
from ditpipe.pipeline.ema import EMA
from ditpipe.pipeline.errors import DitpipeError

SNAPSHOT_DIR = "phema"  # outputs/<run>/phema/: written by training, read by `ditpipe ema`; retention never touches it


# ---------------------------------------------------------------------------------------------------- the math


def exp_to_std(exp) -> np.ndarray:
    """σ_rel of the power-function profile with exponent γ (eq. 123)."""
    g = np.float64(exp)
    return np.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))


def std_to_exp(std) -> np.ndarray:
    """γ for a σ_rel (eq. 126): the largest real root of γ³ + 7γ² + (16 − σ⁻²)γ + (12 − σ⁻²) = 0, which is
    (γ+1)·σ⁻² = (γ+2)²(γ+3) multiplied out."""
    std = np.asarray(std, dtype=np.float64)
    s = std.reshape(-1) ** -2
    roots = [np.roots([1.0, 7.0, 16.0 - x, 12.0 - x]).real.max() for x in s]
    return np.asarray(roots, dtype=np.float64).reshape(std.shape)


def check_sigma_rel(sigma: float, what: str) -> float:
    """A σ_rel that a power function with γ ≥ 0 can have, or a one-line error naming `what` (a flag or a key)."""
    if not 0.0 < sigma <= MAX_SIGMA_REL:
        raise DitpipeError(f"{what} {sigma:g} is out of range: σ_rel must be in (0, {MAX_SIGMA_REL:.4f}] (0.05–0.2 "
                           "is the useful range; 0.2887 is the plain running mean)")
    return float(sigma)


def power_function_correlation(t_a, std_a, t_b, std_b) -> np.ndarray:
    """∫ p_a(τ) p_b(τ) dτ of two profiles ending at t_a and t_b (eq. 151), broadcast over the arguments. Both are
    zero past their end, so the integral runs to min(t_a, t_b); with t_a ≤ t_b it is
    (γa+1)(γb+1) / ((γa+γb+1)·t_b) · (t_a/t_b)^γb, and symmetrically."""
    g_a, g_b = std_to_exp(std_a), std_to_exp(std_b)
    t_a, t_b = np.float64(t_a), np.float64(t_b)
    ratio = np.where(t_a <= t_b, t_a / t_b, t_b / t_a)  # ≤ 1, so the power never overflows
    power = np.where(t_a <= t_b, g_b, g_a)
    return (g_a + 1) * (g_b + 1) / ((g_a + g_b + 1) * np.maximum(t_a, t_b)) * ratio ** power


def power_beta(exp: float, t: int) -> float:
    """β for the t-th update (t ≥ 1) of the EMA with exponent γ (eq. 127 with Δt = 1)."""
    return (1.0 - 1.0 / t) ** (exp + 1.0)


def solve_posthoc_coefficients(in_t, in_std, out_t, out_std) -> np.ndarray:
    """(inputs, outputs) coefficients: column j combines the input profiles into the one nearest output j's (the
    normal equations A x = b of the L2 fit, A the inputs' Gram matrix), scaled to sum to 1 so that the result is
    an average of the snapshots (EDM2 algorithm 3)."""
    col = lambda x: np.asarray(x, dtype=np.float64).reshape(-1, 1)  # noqa: E731
    row = lambda x: np.asarray(x, dtype=np.float64).reshape(1, -1)  # noqa: E731
    in_t, in_std = np.broadcast_arrays(np.float64(in_t), np.float64(in_std))
    out_t, out_std = np.broadcast_arrays(np.float64(out_t), np.float64(out_std))
    gram = power_function_correlation(col(in_t), col(in_std), row(in_t), row(in_std))  # (n, n)
    target = power_function_correlation(col(in_t), col(in_std), row(out_t), row(out_std))  # (n, m)
    x = np.linalg.solve(gram, target)  # (n, m)
    return x / x.sum(axis=0, keepdims=True)


@dataclass(frozen=True)
class Fit:
    """How one reconstruction was made: its coefficients and how trustworthy they are."""

    steps: np.ndarray  # (n,) the snapshots' steps
    sigmas: np.ndarray  # (n,) their σ_rel
    coefficients: np.ndarray  # (n,) summing to 1
    condition: float  # of the snapshots' Gram matrix: large means nearly dependent profiles, cancelling weights
    profile_error: float  # relative L2 distance between the combined profile and the wanted one

    def summary(self) -> str:
        c = self.coefficients
        return (f"{len(c)} snapshots (steps {int(self.steps.min()):,}–{int(self.steps.max()):,}, σ_rel "
                f"{', '.join(f'{s:g}' for s in sorted(set(self.sigmas.tolist())))}); condition {self.condition:.2e}; "
                f"coefficients {c.min():+.3f} … {c.max():+.3f} (Σ|c| {np.abs(c).sum():.2f}); profile fit error "
                f"{self.profile_error:.2%}")


def fit(steps, sigmas, step: int, sigma_rel: float) -> Fit:
    """The coefficients for the EMA of `sigma_rel` at `step` from snapshots at `steps` of `sigmas`."""
    steps, sigmas = np.asarray(steps, dtype=np.float64), np.asarray(sigmas, dtype=np.float64)
    x = solve_posthoc_coefficients(steps, sigmas, step, sigma_rel)[:, 0]  # (n,)
    gram = power_function_correlation(steps[:, None], sigmas[:, None], steps[None, :], sigmas[None, :])  # (n, n)
    b = power_function_correlation(steps, sigmas, step, sigma_rel)  # (n,)
    c = float(power_function_correlation(step, sigma_rel, step, sigma_rel))
    error = max(float(x @ gram @ x - 2 * x @ b + c), 0.0) / c  # ‖Σ x_i p_i − p‖² / ‖p‖²
    return Fit(steps, sigmas, x, float(np.linalg.cond(gram)), float(np.sqrt(error)))


# ---------------------------------------------------------------------------------------------------- tracking


class PowerEMA:
    """The tracked power-function EMAs: one fp32 shadow per σ_rel, on the model's device (the classic EMA's class,
    with its own β per update). Updated on the device in the step, weighted by whether the optimizer applied the
    update, so a skipped step moves none of them and nothing waits for the host."""

    def __init__(self, model: torch.nn.Module, sigma_rels: list[float]):
        self.sigma_rels = [check_sigma_rel(float(s), "training.posthoc_ema_sigmas:") for s in sigma_rels]
        self.exps = [float(g) for g in std_to_exp(self.sigma_rels)]
        self.emas = [EMA(model) for _ in self.sigma_rels]

    def update(self, step: int, applied: torch.Tensor | None = None) -> None:
        """After optimizer step `step` (0-based): the (step + 1)-th update of each EMA."""
        for ema, exp in zip(self.emas, self.exps):
            ema.update(power_beta(exp, step + 1), applied)

    def gathered(self) -> list[dict[str, torch.Tensor]] | None:
        """Each shadow whole on the CPU, gathered from its shards (training.parallel fsdp: a collective every rank
        calls, one tensor at a time on the device); None when the shadows are not sharded (write_snapshots reads
        them itself)."""
        from torch.distributed.tensor import DTensor

        if not any(isinstance(v, DTensor) for v in self.emas[0].shadow.values()):
            return None
        return [{k: (v.full_tensor() if isinstance(v, DTensor) else v).cpu() for k, v in ema.shadow.items()}
                for ema in self.emas]

    def state_dict(self) -> dict:
        return {"sigma_rels": list(self.sigma_rels), "emas": [ema.state_dict() for ema in self.emas]}

    def load_state_dict(self, state: dict) -> None:
        if [float(s) for s in state["sigma_rels"]] != self.sigma_rels:
            raise DitpipeError(f"the checkpoint tracks post-hoc EMAs of σ_rel {state['sigma_rels']}, this run "
                               f"{self.sigma_rels}; resume with training.posthoc_ema_sigmas as the run had it")
        for ema, saved in zip(self.emas, state["emas"]):
            ema.load_state_dict(saved)


# ---------------------------------------------------------------------------------------------------- snapshots


@dataclass(frozen=True)
class Snapshot:
    step: int
    sigma_rel: float
    path: Path


def snapshot_path(folder: Path, step: int, sigma_rel: float) -> Path:
    return Path(folder) / f"step-{step:07d}-sigma-{sigma_rel:g}.safetensors"


def write_snapshots(folder: Path, step: int, phema: PowerEMA,
                    gathered: list[dict[str, torch.Tensor]] | None = None) -> list[Path]:
    """Every tracked EMA at `step`, each atomically (temporary name, fsync, rename). The same state always gives
    the same bytes, so a step run again after a resume rewrites its snapshots unchanged. `gathered`: the shadows
    whole (PowerEMA.gathered, for sharded ones), else they are read from `phema`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    written = []
    shadows = gathered if gathered is not None else [ema.state_dict() for ema in phema.emas]
    for sigma, shadow in zip(phema.sigma_rels, shadows):
        path = snapshot_path(folder, step, sigma)
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in shadow.items()}
        try:
            folder.mkdir(parents=True, exist_ok=True)  # in the try: a folder that cannot be made is the same failure
            with atomic_path(path) as tmp:
                save_file(state, str(tmp), metadata={"format": "pt", "step": str(step), "sigma_rel": repr(sigma)})
                sort_metadata(tmp)
                os.chmod(tmp, new_file_mode())  # safetensors leaves 0600 whatever the umask
        except Exception as e:  # noqa: BLE001 (a full disk: OSError, or safetensors' own error): one line
            raise DitpipeError(f"could not write the post-hoc EMA snapshot '{path}' ({e}); free some space and "
                               "resume from the last checkpoint (`ditpipe resume`)") from None
        written.append(path)
    return written


def sort_metadata(path: Path) -> None:
    """safetensors writes its `__metadata__` in hash-map order, which changes from process to process; rewrite the
    header in place with the keys sorted (the same length: only the order of one object's entries changes)."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":")).encode()
        if len(text) > size:  # never: the same entries, reordered
            raise RuntimeError(f"safetensors header of '{path}' grew when its metadata was sorted")
        f.seek(8)
        f.write(text.ljust(size))


def list_snapshots(folder: Path) -> list[Snapshot]:
    """The snapshots in a run's phema/ folder, by (step, σ_rel) as their metadata say; temporaries are skipped."""
    from safetensors import safe_open

    found = []
    for path in sorted(Path(folder).glob("*.safetensors")) if Path(folder).is_dir() else []:
        if path.name.startswith(".") or path.name.endswith(TMP_SUFFIX):
            continue
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            found.append(Snapshot(int(meta["step"]), float(meta["sigma_rel"]), path))
        except Exception as e:  # noqa: BLE001 (a damaged or foreign file: name it)
            raise DitpipeError(f"cannot read post-hoc EMA snapshot '{path}' ({type(e).__name__}: {e}); move it out "
                               f"of '{folder}' and run again") from None
    return sorted(found, key=lambda s: (s.step, s.sigma_rel))


def reconstruct(snapshots: list[Snapshot], step: int, sigma_rel: float,
                shapes: dict[str, tuple[int, ...]] | None = None) -> tuple[dict[str, torch.Tensor], Fit]:
    """The EMA of `sigma_rel` at `step` from every snapshot at or before `step` (fp32, summed in fp64: the
    coefficients can be large and cancel), and its fit. Every snapshot used is first checked against `shapes` (the
    run's model state dict's keys and shapes; without them, against the first snapshot), so nothing is broadcast."""
    from safetensors.torch import load_file

    used = [s for s in snapshots if s.step <= step]
    check_snapshots(used, shapes)
    f = fit([s.step for s in used], [s.sigma_rel for s in used], step, sigma_rel)
    total: dict[str, torch.Tensor] = {}
    for snap, c in zip(used, f.coefficients):
        for k, v in load_file(str(snap.path)).items():
            part = v.double() * float(c)
            total[k] = total[k] + part if k in total else part
    return {k: v.float() for k, v in total.items()}, f


def snapshot_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """A snapshot's keys and shapes, from its header alone (no tensor is read)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def check_snapshots(snapshots: list[Snapshot], shapes: dict[str, tuple[int, ...]] | None = None) -> None:
    """Every snapshot holds exactly the keys of `shapes` with those shapes (the run's model state dict; without it,
    the first snapshot's): summing a (1,) tensor into a (96,) one would broadcast, and a missing or foreign key would
    end in load_state_dict's traceback or, worse, weights averaged over only some snapshots. One line otherwise,
    naming the file and the first differing key."""
    against = "the run's model"
    for snap in snapshots:
        try:
            have = snapshot_shapes(snap.path)
        except Exception as e:  # noqa: BLE001 (a damaged or foreign file: name it)
            raise DitpipeError(f"cannot read post-hoc EMA snapshot '{snap.path}' ({type(e).__name__}: {e}); move it "
                               f"out of '{snap.path.parent}' and run again") from None
        if shapes is None:
            shapes, against = have, f"'{snap.path.name}'"
        elif problem := _first_difference(have, shapes, against):
            raise DitpipeError(f"post-hoc EMA snapshot '{snap.path}' does not match {against}: {problem}; it is not "
                               f"this run's (move it out of '{snap.path.parent}' and run again)")


def _first_difference(have: dict, want: dict, against: str) -> str | None:
    for key in sorted(set(have) | set(want)):
        if key not in want:
            return f"it holds '{key}' {have[key]}, which {against} has not"
        if key not in have:
            return f"it lacks '{key}' {want[key]}, which {against} has"
        if have[key] != want[key]:
            return f"'{key}' is {have[key]} in it, {want[key]} in {against}"
    return None


def pick_step(snapshots: list[Snapshot], step: int | None, folder: Path) -> int:
    """The reconstruction step: `step` when snapshots were written at it, else the last; one-line errors otherwise."""
    if not snapshots:
        raise DitpipeError(f"no post-hoc EMA snapshots in '{folder}': train with --training.posthoc_ema true (they "
                           "are written every checkpointing.phema_every steps and at the end)")
    steps = sorted({s.step for s in snapshots})
    if step is None:
        return steps[-1]
    if step < steps[0]:
        raise DitpipeError(f"--step {step} is before the first post-hoc EMA snapshot (step {steps[0]}); pick one of "
                           f"the snapshot steps {_some(steps)}")
    if step not in steps:
        raise DitpipeError(f"--step {step} has no snapshots (nothing after step {max(s for s in steps if s < step)} "
                           f"is known before it); pick one of the snapshot steps {_some(steps)}")
    return step


def _some(steps: list[int]) -> str:
    return ", ".join(map(str, steps)) if len(steps) <= 8 else f"{', '.join(map(str, steps[:4]))}, …, {steps[-1]}"


def abandon_after(folder: Path, step: int) -> list[Path]:
    """Move every snapshot after `step` aside as `<name>.abandoned` (training.recover went back to `step`: they
    hold the failed stretch, and `list_snapshots`, hence `ditpipe ema`, would use them). Nothing is deleted; a
    name already taken by an earlier recovery gets `.abandoned-2`, `-3`, ... as checkpoints do."""
    moved = []
    for snap in list_snapshots(folder):
        if snap.step > step:
            aside, n = snap.path.with_name(f"{snap.path.name}.abandoned"), 1
            while aside.exists():
                n += 1
                aside = snap.path.with_name(f"{snap.path.name}.abandoned-{n}")
            snap.path.rename(aside)
            moved.append(aside)
    return moved


def clean_temporaries(folder: Path) -> None:
    """Remove the half-written snapshots of a killed run (only our own hidden temporaries)."""
    for p in Path(folder).glob(f".step-*.safetensors.*{TMP_SUFFIX}"):
        p.unlink(missing_ok=True)
