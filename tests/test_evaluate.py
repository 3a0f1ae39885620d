"""`ditpipe evaluate` end to end, offline: a tiny trained model against pixel-codec shards of real images."""

import json
import math

import pytest

from pipeline.config import load_config
from stages.encode import encode
from conftest import train_tiny


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    run = train_tiny(tmp, 64, **{"training.max_steps": 4, "diffusion.objective": "flow"})
    return run, tmp / "shards", tmp


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
