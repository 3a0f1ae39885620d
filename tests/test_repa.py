"""REPA from stored targets (issue 28): the projector and loss equal the official code's numbers, the targets in the
shards are the encoder's tokens of each image and its mirror (both formats, buckets, int8), stale and tampered
targets are refused, and a REPA run holds no image encoder, reads nothing back between log steps, resumes bitwise
after kill -9 and on another number of processes, and samples and exports without its projector.

The encoder is a tiny random-init `Dinov2Model` saved with `save_pretrained` and loaded through the same path as
facebook/dinov2-base; nothing reaches the hub."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ditpipe.pipeline import checkpoint
from ditpipe.pipeline.config import load_config
from ditpipe.pipeline.errors import ConfigError, ShardError
from ditpipe.pipeline.manifest import load_manifest
from ditpipe.pipeline.metrics import read_metrics
from ditpipe.pipeline.repa import Aligned, alignment_loss, build_mlp
from ditpipe.pipeline.shards import verify
from ditpipe.pipeline.store import open_shards
from ditpipe.pipeline.targets import Layout, TargetsError, load_target_encoder, quantize
from ditpipe.stages.encode import encode
from ditpipe.stages.train import train
from tiny import tiny_dit

FIXTURE = Path(__file__).parent / "data" / "repa_parity.json"
CLI = [sys.executable, "-c", "from ditpipe.stages.cli import entry; entry()"]
LOG, END = 2, 6


def save_tiny_dino(folder: Path, seed: int = 0) -> Path:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    Dinov2Model(Dinov2Config(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                             patch_size=2, image_size=32)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dino(tmp_path_factory):
    return save_tiny_dino(tmp_path_factory.mktemp("dino") / "tiny-dinov2")


def data(out: Path, encoder: Path | str, **over) -> dict:
    """Shapes at 16 px through the pixel codec, 64 images in 2 shards, targets on patch 2's 8×8 grid."""
    return {"data.dataset_name": "shapes", "data.image_size": 16, "data.num_samples": 64, "vae.name": "pixel",
            "data.num_workers": 0, "shards.samples_per_shard": 32, "shards.path": str(out),
            "targets.encoder": str(encoder), "model.patch_size": 2, **over}


def encoded(dino: Path, tmp_path_factory, fmt: str) -> Path:
    out = tmp_path_factory.mktemp(f"repa-{fmt}") / "shards"
    encode(load_config(None, data(out, dino, **{"shards.format": fmt})))
    return out


@pytest.fixture(scope="module")
def shards(dino, tmp_path_factory):
    """Tar shards with targets: the training tests' (Parquet's own run is the elastic test's)."""
    return encoded(dino, tmp_path_factory, "wds")


@pytest.fixture(scope="module")
def parquet_shards(dino, tmp_path_factory):
    return encoded(dino, tmp_path_factory, "parquet")


def run_config(shards: Path, dino: Path, outputs: Path, name: str, **over) -> dict:
    return {**data(shards, dino), "model.name": "DiT-S/2", "model.hidden_size": 32, "model.depth": 2,
            "model.num_heads": 2, "training.repa.weight": 0.5, "training.repa.depth": 1,
            "training.repa.projector_dim": 16, "training.batch_size": 4, "training.gradient_accumulation_steps": 2,
            "training.max_steps": END, "training.mixed_precision": "no", "training.learning_rate": 1e-3,
            "lr_scheduler.warmup_steps": 2, "logging.steps": LOG, "checkpointing.steps": LOG,
            "checkpointing.every_epoch": False, "logging.tensorboard": False, "logging.output_dir": str(outputs),
            "logging.run_name": name, **over}


def args(cfg: dict) -> list[str]:
    text = {True: "true", False: "false", None: "null"}
    return [a for k, v in cfg.items() for a in (f"--{k}", text[v] if v is None or isinstance(v, bool) else str(v))]


def env() -> dict:
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "250"}


# ---------------------------------------------------------------------------------------------------- parity


def test_projector_and_alignment_loss_equal_the_official_repa_numbers():
    """tests/data/repa_parity.json: sihyun-yu/REPA's build_mlp and SILoss projection loss run on these inputs."""
    ref = json.loads(FIXTURE.read_text())
    tensor = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    projector = build_mlp(ref["hidden_size"], ref["projector_dim"], ref["z_dim"])
    projector.load_state_dict({k: tensor(v) for k, v in ref["projector"].items()}, strict=True)
    x, target = tensor(ref["x"]), tensor(ref["zs_target"])  # (N, T, hidden), (N, T, z)
    with torch.no_grad():
        z = projector(x)  # (N, T, z)
        loss = alignment_loss(z, target).mean()
    assert (z - tensor(ref["zs"])).abs().max() <= 1e-6
    assert abs(float(loss) - ref["loss"]) <= 1e-6
    two = ref["two_projectors"]  # one encoder's loss is what each of several averages: check the second alone
    second = build_mlp(ref["hidden_size"], ref["projector_dim"], two["z_dim_b"])
    second.load_state_dict({k: tensor(v) for k, v in two["projector_b"].items()})
    with torch.no_grad():
        both = (alignment_loss(projector(x), target).mean()
                + alignment_loss(second(x), tensor(two["zs_target_b"])).mean()) / 2
    assert abs(float(both) - two["loss_same_x"]) <= 1e-6


def test_the_aligned_model_projects_the_output_of_block_depth():
    dit = tiny_dit("DiT-S/2", input_size=8, in_channels=3, num_classes=4, depth=3).eval()
    model = Aligned(dit, depth=2, projector_dim=16, z_dim=5).eval()
    seen = {}
    dit.blocks[1].register_forward_hook(lambda m, i, o: seen.setdefault("block2", o))
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([10, 500]), torch.tensor([0, 3])
    with torch.no_grad():
        out, z = model(x, t, y)
        plain = dit(x, t, y)
    assert torch.equal(out, plain)  # aligning changes nothing the DiT outputs
    assert z.shape == (2, 16, 5) and torch.equal(z, model.projector(seen["block2"]))


# ---------------------------------------------------------------------------------------------------- the shards


def reference_tokens(dino: Path, pixels: np.ndarray) -> torch.Tensor:
    """REPA's preprocess_raw_image for DINOv2, by hand: /255, ImageNet normalisation, bicubic to the grid × patch."""
    from transformers import Dinov2Model

    model = Dinov2Model.from_pretrained(dino).eval()
    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1,
                                                                                                                  1)
    x = torch.nn.functional.interpolate(x, 16, mode="bicubic")  # 8×8 tokens of patch 2
    # REPA resamples DINOv2's 16×16 (here; 37×37 for dinov2-base) position table to the grid once, timm's way
    table = model.embeddings.position_embeddings.data  # (1, 1 + 256, 24)
    grid = torch.nn.functional.interpolate(table[:, 1:].reshape(1, 16, 16, 24).permute(0, 3, 1, 2), size=(8, 8),
                                           mode="bicubic", antialias=True).permute(0, 2, 3, 1).reshape(1, 64, 24)
    model.embeddings.position_embeddings.data = torch.cat([table[:, :1], grid], dim=1)
    with torch.no_grad():
        return model(pixel_values=x).last_hidden_state[:, 1:]  # (N, 64, 24): x_norm_patchtokens


@pytest.mark.parametrize("fmt", ["wds", "parquet"])
def test_stored_targets_are_the_encoders_tokens_of_each_image_and_its_mirror(request, fmt, dino):
    from ditpipe.pipeline.sources import make_source

    shards = request.getfixturevalue("shards" if fmt == "wds" else "parquet_shards")
    m = load_manifest(shards)
    t = m.targets
    assert t["encoder"]["class"] == "Dinov2Model" and t["encoder"]["dim"] == 24 and t["grid"] == [8, 8]
    assert t["slices"] == ["target", "target_flip"] and t["resolution"] == [16, 16]
    assert t["bytes_per_sample"] == 2 * 64 * 24 * 2
    store, _ = open_shards(shards)
    source = make_source(load_config(None, data(shards, dino)).data)
    idx = np.array([0, 5, 40, 63])
    pixels = np.stack([source.load(int(i)).pixels for i in idx])  # (4, 16, 16, 3) uint8
    for mirror in (0, 1):
        out = np.zeros((4, 64, 24), np.float16)
        store.gather_targets(idx, np.full(4, mirror), out)
        want = reference_tokens(dino, pixels[:, :, ::-1] if mirror else pixels)
        assert np.allclose(out.astype(np.float32), want.numpy(), atol=2e-3, rtol=2e-3), mirror
    assert verify(shards)[0] == []


def test_int8_targets_take_half_the_bytes_and_keep_the_direction(tmp_path, dino):
    out = tmp_path / "int8"
    encode(load_config(None, data(out, dino, **{"targets.dtype": "int8", "data.num_samples": 16})))
    m = load_manifest(out)
    assert m.targets["dtype"] == "int8" and m.targets["bytes_per_sample"] == 2 * 64 * (24 + 2)
    assert verify(out)[0] == []
    store, _ = open_shards(out)
    got = np.zeros((16, 64, 24), np.float16)
    store.gather_targets(np.arange(16), np.zeros(16, np.int64), got)
    full = reference_tokens(dino, np.stack([s.pixels for s in map(
        make_shapes(dino, out).load, range(16))])).numpy()
    cos = (got * full).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(full, axis=-1)
    assert cos.min() > 0.999  # the alignment loss moves by < 1e-3 (measured in the README's storage table)
    x = np.random.default_rng(0).standard_normal((2, 5, 7)).astype(np.float32)
    rec, lay = quantize(x), Layout(2, 5, 7, "int8")
    back = np.zeros((5, 7), np.float16)
    lay.decode_into(lay.view(rec.tobytes())[1], back)
    assert np.abs(back - x[1]).max() <= np.abs(x[1]).max() / 127 + 1e-3


def make_shapes(dino: Path, out: Path):
    from ditpipe.pipeline.sources import make_source

    return make_source(load_config(None, data(out, dino)).data)


# ---------------------------------------------------------------------------------------------------- refusals


def test_repa_without_targets_and_on_the_wrong_grid_or_depth_is_refused(tmp_path, shards, dino):
    from conftest import pixel_shards

    plain = pixel_shards(tmp_path / "plain", 16)
    base = run_config(shards, dino, tmp_path / "out", "r")
    no_targets = {**base, "shards.path": str(plain), "targets.encoder": None}
    with pytest.raises(ConfigError, match="--targets dinov2"):
        train(load_config(None, no_targets), config_name="r")
    with pytest.raises(ConfigError, match="patch 2"):
        train(load_config(None, {**base, "model.patch_size": 4}), config_name="r")
    with pytest.raises(ConfigError, match="blocks 1..2"):
        train(load_config(None, {**base, "training.repa.depth": 3}), config_name="r")
    with pytest.raises(ConfigError, match="targets.dtype"):
        train(load_config(None, {**base, "targets.dtype": "int8"}), config_name="r")


def test_dinov2_without_a_local_copy_stops_with_the_command_that_fetches_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(TargetsError) as e:
        load_target_encoder("dinov2")
    msg = str(e.value)
    assert "facebook/dinov2-base" in msg and "save_pretrained('models/dinov2-base')" in msg
    assert "--targets models/dinov2-base" in msg


def test_stale_targets_are_refused_and_verify_names_a_tampered_one(tmp_path, dino, cli):
    """Targets of another encoder are other shards: encode refuses to mix them in, and a run trained on the old
    ones refuses to resume on them (naming the targets); a target altered in place is named by verify."""
    out = tmp_path / "shards"
    encode(load_config(None, data(out, dino)))
    run = train(load_config(None, run_config(out, dino, tmp_path / "o", "r", **{"training.max_steps": 2})),
                config_name="r")
    other = save_tiny_dino(tmp_path / "other-dino", seed=1)
    with pytest.raises(ShardError, match="targets.encoder.hash"):
        encode(load_config(None, data(out, other)))
    encode(load_config(None, data(out, other)), overwrite=True)  # the folder now holds other targets
    code, _, err = cli("resume", run, "--training.max_steps", "4")
    assert code != 0 and "targets" in err and "other-dino" in err, err
    shard = out / "shard-00001.tar"
    side = json.loads((out / "shard-00001.meta.json").read_text())
    at = side["target"]["index"][3][0] + 600  # inside sample 3's target data
    blob = bytearray(shard.read_bytes())
    blob[at] ^= 0xFF
    shard.write_bytes(bytes(blob))
    problems, _ = verify(out)
    assert any("shard-00001.tar" in p and "sha256" in p for p in problems), problems


def test_verify_names_non_finite_targets(tmp_path, dino):
    """A target record made non-finite with every checksum fixed up (a bug or a hostile writer): verify's own
    decode still refuses it."""
    import hashlib

    out = tmp_path / "shards"
    encode(load_config(None, data(out, dino, **{"data.num_samples": 8, "shards.samples_per_shard": 8})))
    shard, sidecar = out / "shard-00000.tar", out / "shard-00000.meta.json"
    side = json.loads(sidecar.read_text())
    blob = bytearray(shard.read_bytes())
    start = side["target"]["index"][2][0] + len(Layout(2, 64, 24, "fp16").header)
    blob[start : start + 2] = np.array([np.nan], np.float16).tobytes()
    shard.write_bytes(bytes(blob))
    side["sha256"] = hashlib.sha256(bytes(blob)).hexdigest()
    sidecar.write_text(json.dumps(side))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][0].update(sha256=side["sha256"], sidecar_sha256=hashlib.sha256(sidecar.read_bytes()).hexdigest())
    (out / "manifest.json").write_text(json.dumps(manifest))
    problems, _ = verify(out)
    assert any("targets have NaN or Inf" in p for p in problems), problems


# ---------------------------------------------------------------------------------------------------- training


def test_a_repa_run_holds_no_image_encoder_and_logs_the_alignment(tmp_path, shards, dino):
    """The CLI trains in a fresh process; at its end no transformers module was imported and no encoder exists."""
    cfg = run_config(shards, dino, tmp_path / "out", "r", **{"diffusion.objective": "flow",
                                                            "model.learn_sigma": False})
    probe = ("import gc, sys\nfrom ditpipe.stages.cli import main\n"
             f"code = main({['train', *args(cfg)]!r})\n"
             "mods = [m for m in sys.modules if m.startswith('transformers') or m.endswith('inception_tokens')]\n"
             "nets = [type(o).__name__ for o in gc.get_objects() if isinstance(o, __import__('torch').nn.Module)"
             " and type(o).__module__.startswith(('transformers', 'ditpipe.pipeline.inception'))]\n"
             "print('PROBE', code, len(mods), len(nets))\n")
    done = subprocess.run([sys.executable, "-c", probe], env=env(), capture_output=True, text=True, timeout=300)
    assert "PROBE 0 0 0" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]
    said = " ".join(done.stderr.split())
    assert "Align: " in said and "64 tokens × 24, fp16, 6 KiB a sample), read from the shards" in said
    run = tmp_path / "out" / "r"
    logged = read_metrics(run)
    assert len(logged) == END // LOG and all(np.isfinite(m["align_loss"]) for m in logged)
    assert logged[-1]["align_loss"] < logged[0]["align_loss"]  # the projector learns to align
    final = run / checkpoint.step_name(END)
    assert (final / checkpoint.PROJECTOR).is_file()
    projector = torch.load(final / checkpoint.PROJECTOR, weights_only=True)
    assert set(projector) == {f"{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias")}
    model = torch.load(final / checkpoint.MODEL, weights_only=True)
    assert not any("projector" in k for k in model)  # the official layout: sample and export never see it


def test_sample_and_export_ignore_the_projector_and_resume_refuses_other_repa_keys(tmp_path, shards, dino, cli):
    cfg = run_config(shards, dino, tmp_path / "out", "r", **{"training.max_steps": 2})
    run = train(load_config(None, cfg), config_name="r")
    code, _, err = cli("resume", run, "--training.repa.weight", "0.3", "--training.max_steps", "4")
    assert code == 2 and "training.repa.weight: was 0.5 in the run, now 0.3" in " ".join(err.split()), err
    code, out, err = cli("inspect", shards)
    assert code == 0 and "6,144 bytes a sample" in " ".join((out + err).split()), out + err
    code, _, err = cli("sample", "--checkpoint", run, "--num-samples", "4", "--steps", "2", "--out",
                       tmp_path / "grid.png")
    assert code == 0, err
    code, _, err = cli("export", run, "--format", "safetensors", "--out", tmp_path / "exported")
    assert code == 0, err


def test_a_repa_run_reads_nothing_back_between_log_steps(tmp_path, shards, dino):
    from test_host_syncs import LOG as SYNC_LOG, END as SYNC_END, checked_run

    cfg = run_config(shards, dino, tmp_path, "sync", **{"logging.steps": SYNC_LOG, "checkpointing.steps": SYNC_LOG,
                                                       "training.max_steps": SYNC_END, "training.posthoc_ema": True,
                                                       "checkpointing.phema_every": SYNC_LOG,
                                                       "training.mixed_precision": "bf16"})
    del cfg["logging.output_dir"]
    checked_run(cfg, tmp_path)


def wait_for(path: Path, proc: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.time() + seconds
    while not path.is_dir():
        assert proc.poll() is None, f"the run ended before {path.name}"
        assert time.time() < deadline, f"no {path.name} after {seconds} s"
        time.sleep(0.02)


@pytest.mark.usefixtures("one_thread")
def test_a_repa_run_killed_with_sigkill_resumes_bitwise(tmp_path, shards, dino):
    """With post-hoc EMAs and accumulation: kill -9 right after checkpoint-2, `ditpipe resume`, and every file of
    the final checkpoint (model, EMA, projector, optimizer, post-hoc EMAs, RNG) and every logged loss and alignment
    loss equal an uninterrupted run's."""
    over = {"training.posthoc_ema": True, "checkpointing.phema_every": LOG}
    ref = train(load_config(None, run_config(shards, dino, tmp_path / "ref", "r", **over)), config_name="r")
    cut_cfg = run_config(shards, dino, tmp_path / "cut", "r", **over)
    logs = tmp_path / "logs.txt"
    with open(logs, "wb") as log:
        p = subprocess.Popen([*CLI, "train", *args(cut_cfg)], stdout=log, stderr=log,
                             env={**env(), "DITPIPE_CHECKPOINT_PAUSE_S": "0.05"})
        wait_for(tmp_path / "cut" / "r" / checkpoint.step_name(2), p)
        p.send_signal(signal.SIGKILL)
        assert p.wait(30) == -signal.SIGKILL, "the run ended before it could be killed"
    run = tmp_path / "cut" / "r"
    done = subprocess.run([*CLI, "resume", str(run)], env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:] + logs.read_text()[-2000:]
    final = checkpoint.step_name(END)
    for name in ("model.pt", "ema.pt", "projector.pt", "optimizer.pt", "phema.pt", "rng-rank0.pt"):
        a = torch.load(run / final / name, weights_only=True)
        b = torch.load(ref / final / name, weights_only=True)
        assert json.dumps(_flat(a)) == json.dumps(_flat(b)), name
    got, want = read_metrics(run), read_metrics(ref)
    assert [(m["step"], m["loss"], m["align_loss"]) for m in got] == \
           [(m["step"], m["loss"], m["align_loss"]) for m in want]


def _flat(state) -> object:
    """A state (nested dicts, lists, tensors) as JSON-able exact values: tensors by their bytes' hash."""
    import hashlib

    if isinstance(state, torch.Tensor):
        t = state.detach().cpu().contiguous().reshape(-1)
        return f"{t.dtype}{tuple(state.shape)}:" + hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()
    if isinstance(state, dict):
        return {str(k): _flat(v) for k, v in sorted(state.items(), key=lambda kv: str(kv[0]))}
    if isinstance(state, (list, tuple)):
        return [_flat(v) for v in state]
    return repr(state)


@pytest.mark.slow  # torchrun's start and three tiny runs: ~18 s on 2 busy cores; CI runs it with -m slow
def test_a_repa_run_on_two_processes_resumes_on_one(tmp_path, parquet_shards, dino):
    """Global batch 8: 2 processes × batch 4 to step 2, then `resume` on 1 process (accumulation 2, as elastic
    resume chooses) to the end; the weights and the projector equal a 1-process run's up to float summation order,
    and the logged losses too."""
    bin_dir, shards = Path(sys.executable).parent, parquet_shards
    ref = train(load_config(None, run_config(shards, dino, tmp_path / "ref", "r")), config_name="r")
    cut = run_config(shards, dino, tmp_path / "two", "r", **{"training.gradient_accumulation_steps": 1,
                                                            "training.max_steps": 2})
    done = subprocess.run([str(bin_dir / "torchrun"), "--standalone", "--nproc_per_node", "2",
                           str(bin_dir / "ditpipe"), "train", *args(cut)], env=env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = tmp_path / "two" / "r"
    done = subprocess.run([*CLI, "resume", str(run), "--training.max_steps", str(END)], env=env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "keeps its global batch 8" in " ".join(done.stderr.split())
    final = checkpoint.step_name(END)
    for name in ("model.pt", "projector.pt", "ema.pt"):
        a = torch.load(run / final / name, weights_only=True)
        b = torch.load(ref / final / name, weights_only=True)
        gap = sum(float((a[k].double() - b[k].double()).square().sum()) for k in b) ** 0.5
        assert gap <= 1e-5 * sum(float(b[k].double().square().sum()) for k in b) ** 0.5, name
    assert [m["align_loss"] for m in read_metrics(run)] == pytest.approx(
        [m["align_loss"] for m in read_metrics(ref)], rel=1e-5)


def test_buckets_carry_targets_on_each_buckets_grid_and_train(tmp_path, dino):
    from test_buckets import data_for, mixed_folder

    d = {**data_for("custom", mixed_folder(tmp_path / "photos"), tmp_path / "shards"), "model.name": "DiT-S/2",
         "targets.encoder": str(dino), "data.image_size": 16}
    encode(load_config(None, d))
    m = load_manifest(tmp_path / "shards")
    store, _ = open_shards(tmp_path / "shards")
    for s, entry in enumerate(m.entries):
        _, _, h, w = m.latent_shape(entry.get("bucket"))
        assert store.layouts[s].tokens == (h // 2) * (w // 2)  # one target a DiT token, on the bucket's grid
    assert verify(tmp_path / "shards")[0] == []
    cfg = {**d, "model.hidden_size": 32, "model.depth": 2, "model.num_heads": 2, "training.repa.weight": 0.5,
           "training.repa.depth": 1, "training.repa.projector_dim": 16, "training.batch_size": 2,
           "training.gradient_accumulation_steps": 1, "training.max_steps": 4, "training.mixed_precision": "no",
           "logging.steps": 1, "logging.tensorboard": False, "checkpointing.steps": 4,
           "logging.output_dir": str(tmp_path / "out"), "logging.run_name": "b", "lr_scheduler.warmup_steps": 1}
    run = train(load_config(None, cfg), config_name="b")
    assert all(np.isfinite(x["align_loss"]) for x in read_metrics(run))


def test_a_repa_run_and_its_resume_keep_every_tensor_on_the_device(tmp_path, shards, dino):
    """On the meta device (tests/devices.py on_meta refuses a CPU tensor among device ones, as CUDA does): the
    targets, the projector and its optimizer state live on the run's device, through a resume too."""
    from devices import HostReads, on_meta

    cfg = load_config(None, run_config(shards, dino, tmp_path / "out", "m", **{"training.max_steps": 4}))
    mode = HostReads(serve=True)
    with on_meta(), mode:
        run = train(cfg, config_name="m")
    assert mode.between_log_steps(LOG, 4) == [], "\n".join(map(str, mode.between_log_steps(LOG, 4)[:3]))
    resumed = HostReads(serve=True)
    with on_meta(), resumed:
        train(load_config(None, run_config(shards, dino, tmp_path / "out", "m", **{"training.max_steps": 6})),
              resume=run / checkpoint.step_name(4))
    assert resumed.between_log_steps(LOG, 6) == []


def test_a_compiled_repa_run_makes_one_graph(tmp_path, shards, dino, monkeypatch):
    from test_recompiles import BACKEND, compiles
    import functools

    from torch._dynamo import config
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=BACKEND))
    with config.patch(recompile_limit=config.recompile_limit):
        run = train(load_config(None, run_config(shards, dino, tmp_path / "out", "c", **{"model.compile": True})),
                    config_name="c")
        assert read_metrics(run)[-1]["step"] == END
        assert compiles() == (1, 1, 1, [])
    torch._dynamo.reset()


@pytest.mark.cuda
def test_targets_encoded_on_cuda_equal_the_cpu_ones_and_a_repa_run_trains_there(tmp_path, shards, dino):
    """The CUDA branches: the encoder on the GPU (pinned uint8 pixels copied there, fp32 maths), and the step with
    the targets moved to the device without blocking."""
    encoder = load_target_encoder(str(dino), torch.device("cuda"))
    pixels = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8)
    on_gpu = encoder(pixels.cuda(), (8, 8), False).cpu()
    on_cpu = load_target_encoder(str(dino))(pixels, (8, 8), False)
    assert torch.allclose(on_gpu, on_cpu, atol=1e-4, rtol=1e-4)
    run = train(load_config(None, run_config(shards, dino, tmp_path / "out", "g",
                                             **{"training.mixed_precision": "bf16"})), config_name="g")
    assert all(np.isfinite(m["align_loss"]) for m in read_metrics(run))


@pytest.mark.parametrize("fmt", ["wds", "parquet"])
def test_targets_read_from_a_url_equal_the_local_ones(request, fmt):
    """A shard folder at a URL (fsspec's memory filesystem here) is read shard by shard into memory, checked against
    the manifest's sha256: its targets come out as the local folder's."""
    import fsspec

    local = request.getfixturevalue("shards" if fmt == "wds" else "parquet_shards")
    mem, root = fsspec.filesystem("memory"), f"/repa-{fmt}"
    for p in local.iterdir():
        if p.is_file():
            mem.pipe_file(f"{root}/{p.name}", p.read_bytes())
    try:
        idx, slices = np.array([3, 40, 7, 63]), np.array([0, 1, 1, 0])
        outs = []
        for where in (local, f"memory://{root}"):
            store, _ = open_shards(where)
            out = np.zeros((4, 64, 24), np.float16)
            store.gather_targets(idx, slices, out)
            outs.append(out)
        assert np.array_equal(outs[0], outs[1]) and np.abs(outs[0]).sum() > 0
    finally:
        mem.rm(root, recursive=True)


@pytest.mark.parametrize("config, device", [("cpu", "cpu"), (None, "cpu"), (None, "cuda")])
def test_encodes_next_line_proposes_repa_on_a_block_the_model_has(config, device):
    """After `encode --targets`, the printed train command turns REPA on, at REPA's depth 8 where the model has 8
    blocks or more, else a third of its blocks (configs/cpu.yaml's 4: block 1); and it validates."""
    from ditpipe.pipeline.config import parse_overrides, train_command

    over = {"data.dataset_name": "shapes", "data.num_samples": 10, "targets.encoder": "inception"}
    argv, _ = train_command(load_config(config, over), config, over, device)
    given = parse_overrides(argv[argv.index("--config") + 2:] if "--config" in argv else argv[2:])
    cfg = load_config(argv[argv.index("--config") + 1] if "--config" in argv else None, given)
    assert cfg.training.repa.weight == 0.5 and cfg.targets.encoder == "inception"
    blocks = cfg.model.depth or 12  # the presets have 12 blocks or more
    assert 1 <= cfg.training.repa.depth <= blocks
