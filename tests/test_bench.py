"""`ditpipe bench`: every part runs at tiny sizes, returns its documented keys with sane numbers, the JSON on stdout
is the JSON in --json, and every ratio comes from the figures of the same run. No speed target is asserted here."""

import json
import math
import subprocess
import sys

import pytest
import torch

from ditpipe.pipeline.step import FLOPS_CONVENTION, forward_flops, train_flops_per_sample
from ditpipe.stages.bench import PARTS, SCHEMA, BenchOptions, command_line, targets

TINY = ["--vae-shape", "tiny", "--image-size", "32", "--encode-images", "4", "--encode-batch", "2", "--jpeg-count",
        "4", "--loader-samples", "512", "--loader-batch", "64", "--repeats", "1", "--steps", "1", "--warmup", "1",
        "--min-seconds", "0.01", "--memory-small", "64", "--memory-large", "256", "--memory-steps", "1",
        "--num-workers", "2", "--threads", "1"]


def ditpipe(*args, timeout=900):
    return subprocess.run([sys.executable, "-c", "from ditpipe.stages.cli import entry; entry()", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """One `ditpipe bench all` at tiny sizes: (stdout JSON, --json file JSON, stderr)."""
    out = tmp_path_factory.mktemp("bench") / "result.json"
    proc = ditpipe("bench", "all", *TINY, "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout), json.loads(out.read_text()), proc.stderr


def positive(*values):
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
               for v in values)


def close(a, b, rel=0.02):
    return math.isclose(a, b, rel_tol=rel)


@pytest.mark.slow  # over 30 s on 2 cores
def test_stdout_is_one_json_object_and_the_same_as_the_json_file(bench):
    printed, written, err = bench
    assert printed == written
    assert printed["schema"] == SCHEMA and printed["parts"] == list(PARTS)
    assert printed["command"].startswith("ditpipe bench all --vae-shape tiny --image-size 32")
    m = printed["machine"]
    assert m["device"] == "cpu" and m["torch_threads"] == 1 and positive(m["cpu_count"])
    assert m["peak_tflops"] is None  # CPU: no MFU without --peak-tflops
    s = printed["settings"]
    assert (s["batch_size"], s["steps"], s["num_workers"], s["encode_images"]) == (4, 1, 2, 4)  # resolved defaults
    assert "[bench] part encode" in err and "[bench] part memory done" in err  # progress on stderr, not stdout


@pytest.mark.slow  # over 30 s on 2 cores
def test_encode_part(bench):
    e = bench[0]["encode"]
    assert (e["vae_shape"], e["image_size"], e["batch_size"], e["images"], e["source"]) == ("tiny", 32, 2, 4, "jpeg")
    assert e["forwards_per_image"] == 2 and e["timed_images"] == 2  # the first batch is untimed
    assert positive(e["pipeline_images_per_s"], e["bare_images_per_s"], e["ratio"], e["pipeline_end_to_end_s"],
                    e["shard_bytes"], e["vae_encoder_gflops_per_image"])
    assert close(e["ratio"], e["pipeline_images_per_s"] / e["bare_images_per_s"])
    assert e["vae_load_s"] >= 0 and e["vae_hash_s"] >= 0
    j = e["jpeg"]
    assert j["count"] == 4 and j["size"] == [640, 480] and j["image_size"] == 32
    assert positive(j["draft_images_per_s"], j["full_images_per_s"], j["load_image_images_per_s"])
    assert close(j["draft_speedup"], j["draft_images_per_s"] / j["full_images_per_s"])
    assert j["draft_decoded_size"] == [80, 60]  # 640x480 at 1/8 scale still covers 32 px


@pytest.mark.slow  # over 30 s on 2 cores
def test_loader_part(bench):
    lo = bench[0]["loader"]
    assert lo["samples"] == 512 and lo["sample_shape"] == [4, 4, 4, 4] and lo["batch_size"] == 64
    assert lo["num_workers"] == 2 and lo["repeats"] == 1
    assert positive(lo["tar_samples_per_s"], lo["parquet_samples_per_s"], lo["npy_samples_per_s"])
    assert close(lo["tar_over_npy"], lo["tar_samples_per_s"] / lo["npy_samples_per_s"])
    assert close(lo["parquet_over_npy"], lo["parquet_samples_per_s"] / lo["npy_samples_per_s"])
    assert {k: len(v) for k, v in lo["trials"].items()} == {"tar": 1, "parquet": 1, "npy": 1}
    assert set(lo["per_sample_us"]) == {"read_tar", "read_parquet", "read_npy", "sample_key", "eps_draw",
                                        "latent_view", "microbatch_tar", "microbatch_parquet", "microbatch_npy",
                                        "worker_tar", "worker_parquet", "worker_npy"}
    assert all(v >= 0 for v in lo["per_sample_us"].values())
    assert positive(*lo["cpu_ceiling_samples_per_s"].values(), lo["eps_ceiling_samples_per_s"])


@pytest.mark.slow  # over 30 s on 2 cores
def test_train_part(bench):
    t = bench[0]["train"]
    assert (t["model"], t["vae_shape"], t["image_size"], t["latent_shape"]) == ("DiT-S/2", "tiny", 32, [4, 4, 4])
    assert t["precision"] == "bf16"  # fp16 on CPU resolves to bf16, as training does
    for mode in ("precomputed", "online"):
        r = t[mode]
        assert r["steps"] >= 1 and positive(r["seconds"], r["steps_per_s"], r["images_per_s"])
        assert close(r["images_per_s"], r["steps_per_s"] * t["batch_size"] * t["accum"])
    assert close(t["speedup"], t["precomputed"]["steps_per_s"] / t["online"]["steps_per_s"])
    assert positive(t["t_step_s"], t["t_vae_s"], t["dit_gflops_per_step"], t["vae_gflops_per_step"])
    assert close(t["ideal_ratio"], (t["t_step_s"] + t["t_vae_s"]) / t["t_step_s"])
    assert close(t["achieved_fraction"], t["speedup"] / t["ideal_ratio"])
    assert t["mfu_precomputed"] is None and t["mfu_online"] is None
    assert t["gradient_checkpointing"] is False and t["flops_convention"] == FLOPS_CONVENTION
    x = t["extrapolate"]
    assert x["images"] == 250000 and close(x["precomputed_s"], 250000 / t["precomputed"]["images_per_s"])


@pytest.mark.slow  # over 30 s on 2 cores
def test_memory_part(bench):
    m = bench[0]["memory"]
    pre, onl = m["train"]["precomputed"], m["train"]["online"]
    assert positive(pre["peak_mib"], onl["peak_mib"]) and pre["cuda_peak_mib"] is None
    assert pre["diffusers_imported"] is False and pre["vae_constructed"] is False  # never holds VAE weights
    assert onl["diffusers_imported"] is True and onl["vae_constructed"] is True  # the check can see one
    assert close(m["train"]["online_over_precomputed"], onl["peak_mib"] / pre["peak_mib"])
    lo = m["loader"]
    assert (lo["small_samples"], lo["large_samples"], lo["image_size"]) == (64, 256, 8)
    for fmt in ("wds", "parquet"):
        small, large = lo[fmt]["small"], lo[fmt]["large"]
        assert (small["samples"], large["samples"]) == (64, 256)
        assert small["streamed"] == large["streamed"] == 256  # the same work from both shard sets
        assert small["workers"] == large["workers"] == 2
        assert positive(small["main_peak_mib"], small["workers_peak_mib"], large["total_peak_mib"])
        assert close(small["total_peak_mib"], small["main_peak_mib"] + small["workers_peak_mib"], rel=1e-3)
        assert close(lo[fmt]["ratio"], large["total_peak_mib"] / small["total_peak_mib"], rel=1e-3)


@pytest.mark.slow  # over 30 s on 2 cores
def test_targets_are_listed_with_their_values(bench):
    result = bench[0]
    listed = result["targets"]
    assert {t["part"] for t in listed} == set(PARTS)
    for t in listed:
        assert set(t) == {"name", "part", "target", "value", "met", "applies"}
    vae = next(t for t in listed if t["name"].startswith("precomputed training never holds"))
    assert vae["met"] is True and vae["applies"] is True
    # tiny sizes are not the sizes the speed targets are stated for
    assert not any(t["applies"] for t in listed if t["part"] in ("encode", "train"))
    assert targets(result) == listed  # a pure function of the figures


def test_unknown_part_and_bad_options_are_usage_errors():
    proc = ditpipe("bench", "everything", timeout=120)
    assert proc.returncode == 2 and "everything" in proc.stderr and "Traceback" not in proc.stderr
    proc = ditpipe("bench", "loader", "--device", "tpu", "--vae-shape", "huge", timeout=120)
    assert proc.returncode == 2 and "--device" in proc.stderr and "--vae-shape" in proc.stderr


def test_help_names_the_parts_and_an_example():
    proc = ditpipe("bench", "--help", timeout=120)
    assert proc.returncode == 0
    text = proc.stdout.replace("\n", " ")
    assert "ditpipe bench all --json bench.json" in text and "--vae-shape" in text


def test_defaults_per_device_and_the_reproducing_command():
    cpu, cuda = BenchOptions().resolved(), BenchOptions(device="cuda").resolved()
    assert (cpu.batch_size, cpu.steps, cpu.encode_images, cpu.encode_batch) == (4, 3, 12, 4)
    assert (cuda.batch_size, cuda.steps, cuda.encode_images, cuda.encode_batch) == (256, 20, 1024, 32)
    assert command_line(["all"], BenchOptions()) == "ditpipe bench all"
    assert command_line(["train"], BenchOptions(device="cuda", model="DiT-XL/2", compile=True)) == \
        "ditpipe bench train --device cuda --model DiT-XL/2 --compile"


def test_gpu_targets_apply_only_to_their_models():
    base = {"settings": {"device": "cuda"}, "train": {
        "model": "DiT-XL/2", "vae_shape": "sd", "image_size": 256, "achieved_fraction": 1.0, "mfu_precomputed": 0.55,
        "extrapolate": {"images": 250000, "precomputed_s": 700.0}}}
    got = {t["name"]: t for t in targets(base)}
    assert got["train MFU, DiT-XL/2 precomputed"]["met"] is True and got["train MFU, DiT-XL/2 precomputed"]["applies"]
    assert not got["50 epochs × 5,000 images, DiT-B/2, seconds"]["applies"]
    assert not got["train achieved fraction of the ideal speedup"]["applies"]  # a CPU target


def test_training_flops_count_the_forward_that_gradient_checkpointing_recomputes():
    from ditpipe.pipeline.diffusion import make_objective
    from ditpipe.pipeline.model import build_dit

    model = build_dit("DiT-S/2", input_size=8, in_channels=4, num_classes=8, hidden_size=64, depth=2, num_heads=4)
    objective, x, y = make_objective("ddpm", True), torch.zeros(2, 4, 8, 8), torch.zeros(2, dtype=torch.long)
    forward = forward_flops(model, objective, x, y, True)
    plain = train_flops_per_sample(model, objective, x, y, True)
    model.gradient_checkpointing = True
    assert plain == 3 * forward / 2  # per sample: forward + a backward of two forwards
    assert train_flops_per_sample(model, objective, x, y, True) == pytest.approx(plain * 4 / 3)
    assert "2 per multiply-add" in FLOPS_CONVENTION and "gradient checkpointing" in FLOPS_CONVENTION


def test_dit_xl2_at_256px_counts_twice_the_papers_multiply_adds():
    """The DiT paper gives DiT-XL/2 at 256 px 118.6 Gflops a forward, counting multiply-adds; the flop counter
    counts 2 FLOPs each. Built on the meta device: the count needs shapes, not 675M initialised weights."""
    from ditpipe.pipeline.diffusion import make_objective
    from ditpipe.pipeline.model import build_dit

    with torch.device("meta"):
        model = build_dit("DiT-XL/2", input_size=32, in_channels=4, num_classes=1000)
        x, y = torch.zeros(1, 4, 32, 32), torch.zeros(1, dtype=torch.long)
    flops = forward_flops(model, make_objective("ddpm", True), x, y, True)
    assert flops / 2 / 1e9 == pytest.approx(118.6, rel=0.002)
