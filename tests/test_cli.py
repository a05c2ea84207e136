"""The command line explains itself: help on every flag, allowed values, --no- forms, examples."""

import argparse
import os
import subprocess
import sys

import pytest

import xferlearn
from xferlearn import config
from xferlearn.cli import build_parser, main


def _subcommands():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub.choices


def test_every_flag_of_every_subcommand_has_help():
    parser, commands = _subcommands()
    assert set(commands) >= {"train", "evaluate", "predict", "backbones", "serve", "explain", "export"}
    for name, command in [("xferlearn", parser), *commands.items()]:
        for action in command._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            label = f"{name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and action.help.strip() and action.help != argparse.SUPPRESS, label
            if action.choices and action.option_strings:
                assert all(str(choice) in action.help for choice in action.choices), f"{label}: allowed values"
        if name != "xferlearn":
            assert command.epilog and "xferlearn " in command.epilog, f"{name}: examples in the epilog"


def test_booleans_have_no_forms():
    _, commands = _subcommands()
    for name, command in commands.items():
        for action in command._actions:
            assert not isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)), \
                f"{name} {action.option_strings}: use BooleanOptionalAction"
            if isinstance(action, argparse.BooleanOptionalAction):
                assert any(o.startswith("--no-") for o in action.option_strings)
    train = commands["train"].parse_args(["d", "--tta", "--no-resume", "--no-cv"])
    assert train.tta is True and train.resume is False and train.cv == 0
    assert commands["train"].parse_args(["d", "--cv", "3"]).cv == 3
    assert commands["evaluate"].parse_args(["r", "d", "--no-gallery", "--strict"]).gallery is False


def test_train_choices_come_from_config():
    _, commands = _subcommands()
    by_dest = {a.dest: a for a in commands["train"]._actions}
    for dest, allowed in (("recipe", config.RECIPES), ("threshold", config.THRESHOLDS),
                          ("augment", config.AUGMENT_PRESETS), ("bn_policy", config.BN_POLICIES)):
        assert by_dest[dest].metavar == "{" + ",".join(allowed) + "}"
        assert "one of: " + ", ".join(allowed) in by_dest[dest].help
    assert str(config.MIN_VAL_PER_CLASS) in commands["train"].format_help()


def test_model_calls_take_small_batches_on_a_cpu_and_larger_ones_with_a_gpu(monkeypatch):
    from xferlearn import cli_run
    from xferlearn.models import base

    parser = build_parser()
    for command in (["predict", "RUN", "x.jpeg"], ["evaluate", "RUN", "DATA"], ["stress", "RUN", "DATA"],
                    ["calibrate", "RUN", "DATA", "--out", "R2"]):
        for gpu, expected in ((False, cli_run.CPU_BATCH), (True, cli_run.GPU_BATCH)):
            monkeypatch.setattr(base, "gpu_present", lambda gpu=gpu: gpu)
            assert cli_run.batch_size(parser.parse_args(command)) == expected, command
        assert cli_run.batch_size(parser.parse_args(command + ["--batch-size", "3"])) == 3
    assert (cli_run.CPU_BATCH, cli_run.GPU_BATCH) == (8, 32)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out.strip() == f"xferlearn {xferlearn.__version__}"


def test_compiler_import_says_nothing():
    """torch.utils.cpp_extension logs "No CUDA runtime is found" at import on a machine with a CUDA
    toolkit and no GPU; the compile path imports it with that logger raised."""
    code = ("import logging; logging.basicConfig(level=logging.WARNING); "
            "from xferlearn.models.inference import import_compiler_quietly; import_compiler_quietly(); "
            "import logging as l; assert l.getLogger('torch.utils.cpp_extension').level == 0")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "CUDA_HOME": os.environ.get("CUDA_HOME", "/usr/local")})
    assert result.returncode == 0, result.stderr
    assert "No CUDA runtime" not in result.stderr


def test_a_reader_that_goes_away_ends_the_command_quietly(monkeypatch, capfd):
    """`xferlearn predict RUN dir/ | head`: the closed pipe is not a disk error; exit 1, nothing on stderr."""
    import xferlearn.cli as cli

    def closed_pipe(args):
        raise BrokenPipeError(32, "Broken pipe")

    redirected = []  # stdout is pointed at /dev/null so exit's flush cannot fail again (not done for real here:
    monkeypatch.setattr(cli, "run_predict", closed_pipe)  # it would take pytest's own output with it)
    with monkeypatch.context() as fd_calls:  # undone before the capture's own teardown needs the real ones
        fd_calls.setattr(cli.os, "open", lambda path, flags: ("fd of", path))
        fd_calls.setattr(cli.os, "dup2", lambda source, target: redirected.append((source, target)))
        status = main(["predict", "RUN", "x.jpeg"])
    assert status == 1
    assert capfd.readouterr().err == ""
    assert redirected == [(("fd of", os.devnull), sys.stdout.fileno())]
