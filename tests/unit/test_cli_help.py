"""`--help` of every CLI: each option and positional is described, and each CLI ends with runnable examples."""

from __future__ import annotations

import argparse
import importlib

import pytest

CLIS = ["service.run", "service.sweep", "service.final", "service.encoder", "service.ensemble", "service.prepare",
        "service.report", "service.bench", "service.predict"]


def parser_of(module: str) -> argparse.ArgumentParser:
    return importlib.import_module(module).build_parser()


def walk(parser: argparse.ArgumentParser, name: str):
    """(command name, action) of the parser and of its sub-commands, recursively."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            described = {a.dest for a in action._choices_actions if a.help}
            for sub, subparser in action.choices.items():
                assert sub in described, f"{name} {sub}: sub-command without a help line"
                yield from walk(subparser, f"{name} {sub}")
        elif not isinstance(action, argparse._HelpAction):
            yield name, action


@pytest.mark.parametrize("module", CLIS)
def test_every_option_has_a_help_string(module):
    missing = [f"{cmd}: {'/'.join(a.option_strings) or a.dest}" for cmd, a in walk(parser_of(module), module)
               if not (a.help or "").strip()]
    assert not missing, f"options without help: {missing}"


@pytest.mark.parametrize("module", CLIS)
def test_help_ends_with_examples_of_this_cli(module):
    parser = parser_of(module)
    assert parser.formatter_class is argparse.RawDescriptionHelpFormatter      # keeps the examples' line breaks
    epilog = parser.epilog or ""
    assert epilog.startswith("examples:"), epilog
    commands = [line.strip() for line in epilog.splitlines() if line.strip().startswith("python -m ")]
    assert len(commands) >= 2 and all(c.startswith(f"python -m {module}") for c in commands), commands
    assert "examples:" in parser.format_help()


@pytest.mark.parametrize("module", CLIS)
def test_example_commands_parse(module):
    """Each example (its arguments up to the first comment, placeholders kept) is accepted by the parser."""
    parser = parser_of(module)
    lines, joined = (parser.epilog or "").splitlines(), []
    for line in lines:
        text = line.split("  #", 1)[0].strip()
        if joined and joined[-1].endswith("\\"):
            joined[-1] = joined[-1][:-1] + " " + text
        elif text.startswith("python -m "):
            joined.append(text)
    for command in joined:
        argv = command.split()[3:]                              # after "python -m service.x"
        parser.parse_args(argv)                                 # SystemExit (exit 2) on an unknown option


# Every command's options and positionals, pinned: scripts and checks outside the repo call these CLIs (the
# service/ redesign of #13 moved their code, never their flags).
FLAGS = {
    "service.run": ["method", "--config", "--set", "--print-config", "--threads", "--features",
        "--unseen", "--seen", "--val-unseen", "--class-names", "--descriptions", "--text-encoder", "--tracking-uri",
        "--experiment-name", "--run-dir", "--fresh", "--split", "--splits-file", "--no-progress"],
    "service.sweep": ["method", "--space", "--num-samples", "--scheduler", "--search",
        "--max-concurrent", "--workers-per-trial", "--gpus-per-worker", "--cpus-per-worker", "--trial-retries",
        "--trial-driver", "--splits", "--splits-file", "--experiment-name", "--name", "--tracking-uri",
        "--storage-path", "--address", "--resume", "--smoke", "--ray-logs", "--seed", "--config", "--set",
        "--print-config", "--threads", "--features", "--unseen", "--seen", "--val-unseen", "--class-names",
        "--descriptions", "--text-encoder"],
    "service.final": ["--from", "--seeds", "--noise-draws", "--ablation", "--streams", "--splits",
        "--splits-file", "--storage-path", "--set", "--tracking-uri", "--experiment-name", "--out", "--no-register",
        "--no-progress"],
    "service.encoder train": ["--data", "--unseen", "--benchmark", "--out", "--set", "--tracking-uri",
        "--workers", "--cpus-per-worker", "--gpus-per-worker", "--address", "--storage-path", "--in-process",
        "--no-progress"],
    "service.encoder extract": ["--data", "--unseen", "--benchmark", "--out", "--encoder"],
    "service.ensemble": ["sources", "--weights", "--split", "--tracking-uri", "--experiment-name",
        "--out", "--names"],
    "service.prepare": ["dataset", "--raw", "--out", "--workers", "--frames", "--benchmark",
        "--split-list", "--missing", "--labels", "--dtype", "--chunk-size", "--keep-parts", "--no-progress",
        "--classes", "--per-class", "--seed"],
    "service.report": ["--method", "--splits", "--splits-file", "--tracking-uri", "--out", "--no-log"],
    "service.bench tdsm": ["--device", "--out", "--batch", "--iters", "--warmup", "--candidates",
        "--score-samples", "--draws", "--seed", "--threads", "--quick", "--compile", "--sizes", "--worker"],
    "service.predict": ["inputs", "--model", "--classes", "--classes-file", "--descriptions-file", "--top-k", "--out",
                        "--tracking-uri"],
    "service.bench serve": ["--model", "--tracking-uri", "--classes", "--batch", "--noise-draws", "--iters", "--out"],
    "service.bench prepare": ["--files", "--format", "--workers", "--frames", "--out"],
    "service.bench encoder": ["--device", "--sizes", "--batch", "--extract-batch", "--frames",
        "--iters", "--warmup", "--threads", "--out"],
    "service.bench contended": ["--out", "--sizes", "--competitors", "--rounds", "--iters", "--warmup",
        "--batch", "--worker"],
    "service.bench cocodiff": ["--device", "--out", "--sizes", "--batch", "--infer-batch", "--frames",
        "--classes", "--precision", "--iters", "--warmup", "--threads"],
}


def test_flags_are_the_pinned_ones():
    got = {}
    for module in CLIS:
        for cmd, action in walk(parser_of(module), module):
            got.setdefault(cmd, []).append("/".join(action.option_strings) or action.dest)
    # Each exactly once; their order is --help's layout (since #23 a method's own flags follow the common ones).
    assert all(len(set(flags)) == len(flags) for flags in got.values())
    assert {cmd: sorted(flags) for cmd, flags in got.items()} == {cmd: sorted(flags) for cmd, flags in FLAGS.items()}


def test_final_help_states_the_noise_draws_and_seeds_defaults():
    text = " ".join(parser_of("service.final").format_help().split())
    assert "--noise-draws NOISE_DRAWS tdsm: evaluation noise draws per seed (default: 10, the paper's)" in text
    assert "training seeds (default 3)" in text
