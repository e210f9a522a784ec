"""deps.py: a Python without the packages of requirements.txt gets one line naming them and the
command that installs them, before any of them is imported."""
import subprocess
import sys
from pathlib import Path

import pytest

import deps

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["train.py", "generate_images.py", "evaluate.py", "bench.py", "convert.py", "explore.py"]


def test_required_packages_reads_requirement_lines(tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("# core\ntorch==2.14.1\nscikit-learn>=1.0  # t-SNE\n\nPillow\npytest\n"
                   "some-pkg[extra]~=1.0; python_version > '3'\nnumpy <3\n")
    assert deps.required_packages(req) == {"torch": "torch", "scikit-learn": "sklearn", "Pillow": "PIL",
                                           "some-pkg": "some_pkg", "numpy": "numpy"}


def test_every_requirement_is_found_here_and_a_missing_one_is_named(tmp_path):
    assert deps.missing_packages() == []  # the import names of requirements.txt are right
    req = tmp_path / "requirements.txt"
    req.write_text("numpy\nno-such-package-xyz==1.0\n")
    assert deps.missing_packages(req) == ["no-such-package-xyz"]


def test_the_message_names_the_install_command_or_the_existing_environment(tmp_path):
    assert deps.install_hint("linux", tmp_path).endswith(deps.INSTALL)
    assert deps.install_hint("win32", tmp_path).endswith(deps.INSTALL_WINDOWS)
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "python").touch()
    assert ". .venv/bin/activate" in deps.install_hint("linux", tmp_path)
    assert deps.problem("train.py", missing=[]) is None
    assert "torch, tqdm" in deps.problem("train.py", missing=["torch", "tqdm"])
    old = deps.problem("train.py", version=(3, 9, 18), missing=[])
    assert "needs Python 3.10 or newer" in old and "3.9.18" in old


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_python_without_the_packages_gets_one_line(script):
    """-S leaves site-packages out: the stdlib alone, as a system Python with nothing installed."""
    result = subprocess.run([sys.executable, "-E", "-S", script, "--help"], cwd=REPO, capture_output=True,
                            text=True)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {script} needs torch, ")
    assert lines[0].endswith(deps.install_hint())


def test_ctrl_c_while_a_script_imports_its_packages_is_one_line():
    """The SIGINT is sent once deps.py is imported, as when Ctrl-C lands while torch loads."""
    code = ("import sys; sys.argv = sys.argv[1:]; import os, signal, deps; os.kill(os.getpid(), signal.SIGINT); "
            "import torch")
    result = subprocess.run([sys.executable, "-c", code, str(REPO / "train.py")], cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 130 and result.stderr.strip() == "interrupted while starting; nothing written"


def test_only_the_scripts_take_ctrl_c_over_and_their_main_hands_it_back():
    assert deps.started_as_script([str(REPO / "train.py")]) and deps.started_as_script(["bench.py"], Path.cwd())
    assert not deps.started_as_script([str(REPO / ".venv" / "bin" / "pytest")])
    assert not deps.started_as_script([""]) and not deps.started_as_script([])
    import signal

    import settings
    seen = settings.command(lambda argv: signal.getsignal(signal.SIGINT))
    before = signal.signal(signal.SIGINT, deps.interrupted_while_starting)
    try:
        assert seen() is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)
