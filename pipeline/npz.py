"""The ADM evaluator's `.npz` files (openai/guided-diffusion `evaluations/`), read and written without pickle.

- A sample batch (what `ditpipe sample|evaluate --npz` writes, and what the ADM evaluator scores): `arr_0`, uint8
  (N, H, W, 3). Written as an uncompressed zip member streamed batch by batch, so 50,000 images at 256 px (9.8 GB)
  never sit in memory; under torchrun each rank writes its block to a part file and rank 0 joins them.
- A reference batch (e.g. `VIRTUAL_imagenet256_labeled.npz`): `arr_0` images and, when present, the stored
  statistics `mu`, `sigma` (pool features) and `mu_s`, `sigma_s` (spatial features), which are used as they are.

Members are read through numpy's header parser with object dtypes refused, so a pickled array is an error, never
code run; `arr_0` is streamed from the zip member (compressed members too), as the ADM evaluator reads it.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

from ditpipe.pipeline import atomic
from ditpipe.pipeline.errors import DataError

STATS = {"mu": 1, "sigma": 2, "mu_s": 1, "sigma_s": 2}  # stored statistics and their ranks
MAX_FEATURES = 8192  # a statistic's feature width (Inception pool 2048, ADM spatial 2023): sigma at most 512 MB


def _refuse(path: Path, why: str) -> DataError:
    return DataError(f"'{path}' is not an ADM reference batch: {why}; pass an .npz with `arr_0` (uint8 N×H×W×3) "
                     "and/or `mu`, `sigma` (and `mu_s`, `sigma_s`), as guided-diffusion's evaluations/ publishes")


def _header(member, path: Path, name: str):
    fmt = np.lib.format
    try:
        version = fmt.read_magic(member)
        read = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
        if read is None:
            raise ValueError(f"npy format version {version}")
        shape, fortran, dtype = read(member)  # a literal dict: parsed, never unpickled
    except ValueError as e:
        raise _refuse(path, f"its {name} is not a numpy array ({e})") from None
    if dtype.hasobject:
        raise _refuse(path, f"its {name} holds Python objects (pickled data is never loaded)")
    return shape, fortran, dtype


def members(path: Path) -> set[str]:
    try:
        with zipfile.ZipFile(path) as z:
            return {n.removesuffix(".npy") for n in z.namelist()}
    except (zipfile.BadZipFile, OSError) as e:
        raise _refuse(Path(path), f"not a readable .npz ({e})") from None


def image_shape(path: Path) -> tuple[int, int, int, int] | None:
    """(N, H, W, 3) of `arr_0`, checked to be uint8 images; None when the file has no `arr_0`."""
    path = Path(path)
    if "arr_0" not in members(path):
        return None
    with zipfile.ZipFile(path) as z, z.open("arr_0.npy") as f:
        shape, fortran, dtype = _header(f, path, "arr_0")
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran or shape[0] < 1:
        raise _refuse(path, f"its arr_0 is {dtype} {tuple(shape)}{' (Fortran order)' if fortran else ''}, not "
                            "uint8 N×H×W×3 images")
    return tuple(int(s) for s in shape)


def read_images(path: Path, batch_size: int) -> Iterator[np.ndarray]:
    """`arr_0` in uint8 (B, H, W, 3) batches, streamed from the zip member."""
    path = Path(path)
    n, h, w, c = image_shape(path) or (0, 0, 0, 0)
    if not n:
        raise _refuse(path, "it has no arr_0 images")
    with zipfile.ZipFile(path) as z, z.open("arr_0.npy") as f:
        _header(f, path, "arr_0")
        for start in range(0, n, batch_size):
            count = min(batch_size, n - start)
            data = f.read(count * h * w * c)
            if len(data) != count * h * w * c:
                raise _refuse(path, f"its arr_0 ends after {start} of {n} images (truncated)")
            yield np.frombuffer(bytearray(data), np.uint8).reshape(count, h, w, c)  # writable, for torch


def read_stats(path: Path) -> dict[str, np.ndarray] | None:
    """The stored `mu`, `sigma`, `mu_s`, `sigma_s` (float64) when the file has `mu` and `sigma`, else None. The
    spatial pair is optional; whatever is there is checked for shape and finiteness."""
    path = Path(path)
    names = members(path)
    if not {"mu", "sigma"} <= names:
        return None
    out = {}
    try:
        with zipfile.ZipFile(path) as z:
            for key in STATS:
                if key in names:
                    out[key] = _read_stat(z, path, key)
    except (zipfile.BadZipFile, OSError, EOFError) as e:  # a damaged zip: bad CRC, a member cut short
        raise _refuse(path, f"its statistics cannot be read ({type(e).__name__}: {e})") from None
    for mean, cov in (("mu", "sigma"), ("mu_s", "sigma_s")):
        if mean not in out and cov not in out:
            continue
        m, s = out.get(mean), out.get(cov)
        if m is None or s is None or m.ndim != 1 or s.shape != (m.size, m.size) or not (
                np.isfinite(m).all() and np.isfinite(s).all()):
            raise _refuse(path, f"its {mean}/{cov} are not a finite mean vector and its square covariance")
    return out


def _read_stat(z: zipfile.ZipFile, path: Path, key: str) -> np.ndarray:
    """One statistic as float64, its header checked before anything is allocated: a float of STATS' rank, at most
    MAX_FEATURES wide, and a member exactly as large as its header says (a forged header can name any size)."""
    name = key + ".npy" if key + ".npy" in z.namelist() else key
    with z.open(name) as f:
        shape, fortran, dtype = _header(f, path, key)
        header = f.tell()
        if dtype.kind != "f" or len(shape) != STATS[key] or any(not 0 < d <= MAX_FEATURES for d in shape):
            raise _refuse(path, f"its {key} is {dtype} {tuple(shape)}, not a float{' vector' if STATS[key] == 1 else ''}"
                                f"{' matrix' if STATS[key] == 2 else ''} of at most {MAX_FEATURES} features")
        size = int(np.prod(shape)) * dtype.itemsize
        stored = z.getinfo(name).file_size - header
        if stored != size:
            raise _refuse(path, f"its {key} holds {stored:,} bytes of data where its header {tuple(shape)} {dtype} "
                                f"needs {size:,} ({'truncated' if stored < size else 'trailing bytes'})")
        data = f.read(size)
    if len(data) != size:  # the member ends before the size its zip entry records
        raise _refuse(path, f"its {key} ends after {len(data):,} of {size:,} bytes (truncated)")
    arr = np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C")
    return np.asarray(arr, np.float64)


class PartWriter:
    """This rank's block of samples as raw uint8 bytes in `<npz>.part-<rank>`, in index order; `join` (rank 0, after
    every rank closed its part) writes the `.npz` from the parts and removes them."""

    def __init__(self, npz: Path, rank: int):
        self.npz = Path(npz)
        self.path = part_path(self.npz, rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "wb")
        self.shape: tuple[int, int, int] | None = None
        self.count = 0

    def write(self, images: np.ndarray) -> None:
        if self.shape is None:
            self.shape = images.shape[1:]
        self.file.write(np.ascontiguousarray(images, np.uint8).tobytes())
        self.count += len(images)

    def close(self) -> None:
        self.file.close()


def part_path(npz: Path, rank: int) -> Path:
    return Path(npz).with_name(f"{Path(npz).name}.part-{rank:05d}")


def join(npz: Path, world: int, n: int, image_shape: tuple[int, int, int], chunk: int = 64 << 20) -> None:
    """Write `npz` (arr_0: uint8 (n, *image_shape)) from the ranks' part files, atomically, and delete the parts."""
    npz, parts = Path(npz), [part_path(npz, r) for r in range(world)]
    total = sum(p.stat().st_size for p in parts)
    if total != n * int(np.prod(image_shape)):
        raise DataError(f"the part files of '{npz}' hold {total} bytes, not {n} images of {image_shape}")
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (n, *image_shape)}
    with atomic.atomic_path(npz) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z, \
                z.open("arr_0.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_2_0(member, header)
            for part in parts:
                with open(part, "rb") as f:
                    while block := f.read(chunk):
                        member.write(block)
    for part in parts:
        part.unlink()
