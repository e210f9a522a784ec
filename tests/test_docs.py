"""The documents agree with the code: README's quick start is what CI runs, docs/flags.md is every
script's --help as the code builds it today, and README and docs/results.md stay short enough to read.

docs/flags.md is generated: `UPDATE_DOCS=1 python -m pytest -q tests/test_docs.py` rewrites it."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import bench
import convert
import deps
import evaluate
import explore
import generate_images
import train
from settings import build_parser

REPO = Path(__file__).resolve().parents[1]
TRAIN = " && python train.py --preset demo"
HELP_WIDTH = "100"
# (script, settings prefix, module, its options beside the settings, whether it takes the settings)
SCRIPTS = [("train.py", "", train, train.EXTRA_FLAGS, True),
           ("generate_images.py", "GEN_", generate_images, (), True),
           ("evaluate.py", "EVALUATE_", evaluate, (), True),
           ("convert.py", "CONVERT_", convert, convert.EXTRA_FLAGS, True),
           ("explore.py", "EXPLORE_", explore, (), True),
           ("bench.py", "", bench, bench.EXTRA_FLAGS, False)]
FLAGS_INTRO = ("Every flag of every script, as `python SCRIPT --help` prints it (this file is generated from "
               "the parsers: `UPDATE_DOCS=1 python -m pytest -q tests/test_docs.py`).\n")
BENCH_NOTE = ("bench.py also takes every flag of train.py above (the settings of the model and the training it "
              "times, `--preset` included); below are its own.\n")


def quick_start():
    """The commands of README's quick-start block (its first ```bash block), comments left off."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Quick start"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S)[1]
    return [line.split("   #")[0].strip() for line in block.splitlines() if line.strip()]


def ci_commands():
    """The lines of .ci/run that run something, after its shell settings and cd."""
    lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    return [line for line in lines if line and not line.startswith(("#", "set ", "cd "))]


def test_ci_runs_the_quick_starts_install_and_test_commands_first():
    first, second = quick_start()
    assert first.endswith(TRAIN), first
    assert ci_commands()[:2] == [first[:-len(TRAIN)], second]


def test_the_quick_start_uses_a_virtual_environment_the_scripts_name():
    first, second = quick_start()
    assert first.startswith(deps.INSTALL + " && ")
    assert second.startswith(". .venv/bin/activate && ")
    readme = (REPO / "README.md").read_text()
    assert f"`{deps.INSTALL_WINDOWS}; python train.py --preset demo`" in readme


def test_the_virtual_environment_is_ignored_by_git_and_the_tests():
    if shutil.which("git") and (REPO / ".git").exists():
        ignored = subprocess.run(["git", "check-ignore", "-q", ".venv/bin/python"], cwd=REPO)
        assert ignored.returncode == 0
    else:
        assert ".venv/" in (REPO / ".gitignore").read_text().split()
    assert "testpaths = tests" in (REPO / "pytest.ini").read_text()


def flags_markdown():
    """docs/flags.md as the parsers make it."""
    parts = [FLAGS_INTRO]
    for script, prefix, module, extra, settings in SCRIPTS:
        parser = build_parser(prefix, module.__doc__, extra, settings)
        parser.prog = script
        parts.append(f"\n## {script}\n\n" + ("" if settings else BENCH_NOTE + "\n")
                     + f"```text\n{parser.format_help().rstrip()}\n```\n")
    return "".join(parts)


def test_flags_doc_is_current(monkeypatch):
    monkeypatch.setenv("COLUMNS", HELP_WIDTH)  # argparse wraps the help text at the terminal's width
    expected, path = flags_markdown(), REPO / "docs" / "flags.md"
    if os.environ.get("UPDATE_DOCS"):
        path.write_text(expected)
    assert path.read_text() == expected, "docs/flags.md is stale: UPDATE_DOCS=1 python -m pytest -q tests/test_docs.py"


def test_the_flags_doc_lists_each_scripts_own_flags():
    text = (REPO / "docs" / "flags.md").read_text()
    bench_part = text[text.index("## bench.py"):]
    assert "--check-node" in bench_part and "--iters" in bench_part
    assert "--channel-base INT" not in bench_part  # train.py's, which bench.py takes too
    assert text.count("\n  --channel-base INT ") == 1  # its option line, in train.py's part only


@pytest.mark.parametrize("name", ["README.md", "docs/results.md"])
def test_the_guides_stay_short(name):
    assert (REPO / name).stat().st_size <= 20 * 1024


def test_every_local_link_and_image_in_the_docs_exists():
    for doc in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if not re.match(r"[a-z]+://", target):
                assert (doc.parent / target).exists(), (doc.name, target)
