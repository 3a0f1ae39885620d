"""The CLI: fast help without torch, --version, every verb's help, and errors as one-line messages."""

import shlex
import subprocess
import sys

import pytest
import typer

from ditpipe.pipeline import __version__
from ditpipe.pipeline.config import known_keys, parse_overrides
from ditpipe.stages.cli import app


def run(*args, **kw):
    return subprocess.run([sys.executable, "-c", "from ditpipe.stages.cli import entry; entry()", *args],
                          capture_output=True, text=True, timeout=120, **kw)


def test_help_does_not_import_torch():
    code = ("import sys\nfrom ditpipe.stages.cli import main\nrc = main(['--help'])\n"
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
            "from ditpipe.stages.cli import entry\n"
            "try:\n    entry()\nexcept SystemExit as e:\n    print('exit', e.code, dist.is_initialized())\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-3:] == ["exit", str(rc), str(joined_after)]


def test_version(cli):
    code, out, _ = cli("--version")
    assert code == 0 and out.strip() == f"ditpipe {__version__}"


def registered_verbs() -> dict:
    """Every command the typer app registers, a sub-command by its full name ("config show"): read from the app, so
    a new verb is checked without being listed here. (typer carries its own click: its groups have `commands`.)"""
    def walk(command, words: tuple[str, ...]):
        if hasattr(command, "commands"):
            for name, sub in command.commands.items():
                yield from walk(sub, (*words, name))
        else:
            yield " ".join(words), command

    return dict(walk(typer.main.get_command(app), ()))


VERBS = registered_verbs()


def test_the_verb_list_is_read_from_the_app():
    assert {"encode", "train", "resume", "sample", "evaluate", "inspect", "verify", "config show"} <= set(VERBS)


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_has_help_with_an_example(cli, verb):
    """`ditpipe VERB --help` shows an `Example: ditpipe VERB ...` line from the verb's docstring, and the example is
    a command that parses: only the verb's own options and arguments, every required one given, and any dotted
    override a real config key."""
    code, out, _ = cli(*verb.split(), "--help")
    assert code == 0
    shown = " ".join(out.split())  # rich wraps the help text at the terminal's width
    lines = [line.strip() for line in (VERBS[verb].help or "").splitlines()]
    examples = [one.strip() for line in lines if line.startswith(f"Example: ditpipe {verb}")
                for one in line.removeprefix("Example:").split(";")]  # `inspect` gives two, `; `-separated
    assert examples, f"`ditpipe {verb} --help` has no line starting 'Example: ditpipe {verb}'"
    for example in examples:
        assert example in shown, f"{example!r} is not in `ditpipe {verb} --help`"
        words = shlex.split(example)
        assert words[:1 + len(verb.split())] == ["ditpipe", *verb.split()], example
        argv = words[1 + len(verb.split()):]  # after `ditpipe VERB`
        try:
            ctx = VERBS[verb].make_context(f"ditpipe {verb}", argv)
        except typer.TyperException as e:  # typer's click's UsageError
            pytest.fail(f"the example {example!r} does not parse: {e.format_message()}")
        unknown = set(parse_overrides(ctx.args)) - set(known_keys())
        assert not unknown, f"the example {example!r} sets unknown config keys {sorted(unknown)}"


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
