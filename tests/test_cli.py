"""The CLI: fast help without torch, --version, every verb's help, and errors as one-line messages."""

import subprocess
import sys

import pytest

from pipeline import __version__


def run(*args, **kw):
    return subprocess.run([sys.executable, "-c", "from stages.cli import entry; entry()", *args],
                          capture_output=True, text=True, timeout=120, **kw)


def test_help_does_not_import_torch():
    code = ("import sys\nfrom stages.cli import main\nrc = main(['--help'])\n"
            "assert 'torch' not in sys.modules, 'ditpipe --help imported torch'\nsys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for verb in ("encode", "inspect", "verify"):
        assert verb in proc.stdout


@pytest.mark.parametrize("backend", ["gloo", pytest.param("nccl", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("args, rc, joined_after", [(["--version"], 0, False), (["inspect", "nowhere"], 1, True)])
def test_a_finished_command_leaves_the_process_group(tmp_path, backend, args, rc, joined_after):
    """A rank that finishes leaves its process group before the interpreter tears down (else gloo's threads can abort
    it at exit); after an error it stays, so a rank never blocks in a teardown while a peer waits in a collective."""
    code = ("import sys, torch, torch.distributed as dist\n"
            + ("torch.cuda.set_device(0)\n" if backend == "nccl" else "")  # NCCL's group on the GPU, as a rank's
            + f"dist.init_process_group({backend!r}, init_method='file://{tmp_path}/group', rank=0, world_size=1)\n"
            f"sys.argv = ['ditpipe', *{args!r}]\n"
            "from stages.cli import entry\n"
            "try:\n    entry()\nexcept SystemExit as e:\n    print('exit', e.code, dist.is_initialized())\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-3:] == ["exit", str(rc), str(joined_after)]


def test_version(cli):
    code, out, _ = cli("--version")
    assert code == 0 and out.strip() == f"ditpipe {__version__}"


@pytest.mark.parametrize("verb", ["encode", "inspect", "verify", "runs", "sample", "evaluate", "resume"])
def test_every_verb_has_help_with_an_example(cli, verb):
    code, out, _ = cli(verb, "--help")
    assert code == 0
    assert f"ditpipe {verb}" in out.replace("\n", " ")


def test_unknown_option_and_missing_argument_are_usage_errors(cli):
    code, _, err = cli("verify")
    assert code == 2 and "SHARDS" in err
    code, _, err = cli("encode", "stray")
    assert code == 2 and "stray" in err


def test_domain_errors_are_one_line_with_exit_1(tmp_path):
    proc = run("verify", str(tmp_path / "nowhere"))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "no manifest.json" in proc.stderr and "ditpipe encode" in proc.stderr


def test_missing_custom_folder_names_it(tmp_path):
    proc = run("encode", "--dataset", "custom", "--data-path", str(tmp_path / "absent"), "--vae", "pixel",
               cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "absent" in proc.stderr and "does not exist" in proc.stderr


def test_missing_coco_says_where_to_put_it(tmp_path):
    proc = run("encode", "--dataset", "coco", "--data-path", str(tmp_path / "coco"), "--vae", "pixel", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "train2017" in proc.stderr and "--download" in proc.stderr
