"""The Python and the packages the scripts need, checked before any package is imported: a script
started with a Python that lacks them stops with one line naming what is missing and the command
that installs it, instead of an ImportError traceback.

Each script imports this module first; the check runs on import and does nothing when all is
there. It reads requirements.txt, so the list cannot drift from what the install step installs.
While a script then imports its packages (torch takes seconds), Ctrl-C ends it with one line rather
than an import traceback; the script's main() hands Ctrl-C back to Python (settings.command)."""
import importlib.util
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent
REQUIREMENTS = REPO / "requirements.txt"
MIN_PYTHON = (3, 10)
IMPORT_NAMES = {"pillow": "PIL", "scikit-learn": "sklearn"}  # where the module is not the package's name
TEST_ONLY = {"pytest"}
INSTALL = "python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements.txt"
INSTALL_WINDOWS = r"py -m venv .venv; .venv\Scripts\Activate.ps1; pip install -r requirements.txt"


def required_packages(path=REQUIREMENTS):
    """{package: module} for each line of requirements.txt that the scripts import."""
    packages = {}
    for line in Path(path).read_text().splitlines():
        name = line.split("#")[0].split(";")[0].strip()
        for sep in "[=<>!~ ":
            name = name.split(sep)[0]
        if name and name.lower() not in TEST_ONLY:
            packages[name] = IMPORT_NAMES.get(name.lower(), name.replace("-", "_"))
    return packages


def missing_packages(path=REQUIREMENTS):
    """The packages of requirements.txt whose module this Python cannot find (nothing is imported)."""
    return [name for name, module in required_packages(path).items() if importlib.util.find_spec(module) is None]


def install_hint(platform=sys.platform, repo=REPO):
    """The command that gives a Python these packages: the project's own .venv when it exists."""
    windows = platform == "win32"
    venv_python = repo / ".venv" / ("Scripts/python.exe" if windows else "bin/python")
    if venv_python.exists():
        activate = r".venv\Scripts\Activate.ps1" if windows else ". .venv/bin/activate"
        return f"use the project's environment: {activate} (then run the script again)"
    return f"install them in a virtual environment: {INSTALL_WINDOWS if windows else INSTALL}"


def problem(script, version=sys.version_info, missing=None):
    """The one-line error for this Python, or None when it can run the scripts."""
    if tuple(version[:2]) < MIN_PYTHON:
        return (f"{script} needs Python {'.'.join(map(str, MIN_PYTHON))} or newer; this is "
                f"{'.'.join(map(str, version[:3]))} ({sys.executable})")
    missing = missing_packages() if missing is None else missing
    if missing:
        return (f"{script} needs {', '.join(missing)}, which this Python ({sys.executable}) cannot import; "
                f"{install_hint()}")
    return None


def interrupted_while_starting(signum, frame):
    """SIGINT's handler from this module's import until the script's main() starts."""
    print("\ninterrupted while starting; nothing written", file=sys.stderr)
    sys.exit(128 + signum)


def started_as_script(argv=sys.argv, repo=REPO):
    """Whether this process runs one of the project's scripts (not a test run or another program importing them)."""
    return bool(argv and argv[0]) and Path(argv[0]).resolve().parent == repo and argv[0].endswith(".py")


def check():
    """Exit with status 2 and one line on stderr when this Python cannot run the scripts."""
    message = problem(Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "this script")
    if message:
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


check()
if started_as_script():
    signal.signal(signal.SIGINT, interrupted_while_starting)
