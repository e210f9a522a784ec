"""Mutation check: does the test suite catch realistic mistakes?

    python tools/mutants.py              # every mistake in tools/mutants.txt, two at a time
    python tools/mutants.py -k luma      # those whose name contains "luma"

Each mistake in tools/mutants.txt names a file, a piece of its source (found by what it says, not
by line number, so the list still applies after code moves), what to write instead, and the tests
that should catch it. Each is applied alone to a temporary copy of the repository and those tests
run there; one line per mistake says which test caught it, or SURVIVED (or STALE: the source
piece is no longer in the file exactly once). Exit status 0 when every mistake is caught.
Slow (minutes): not part of the test suite."""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIST = Path(__file__).with_name("mutants.txt")
SKIP = {".git", ".venv", "data", "Models", "saved_examples", "runs"}  # at the top: environment, data, outputs


def read_mutants(path=LIST):
    """[{name, file, find, replace, tests}] from the list: `## name`, then `key: value` lines; `\\n` in a
    value is a line break."""
    mutants, current = [], None
    for line in Path(path).read_text().splitlines():
        if line.startswith("## "):
            current = dict(name=line[3:].strip())
            mutants.append(current)
        elif current is not None and re.match(r"^(file|find|replace|tests): ", line):
            key, value = line.split(": ", 1)
            current[key] = value.replace("\\n", "\n")
    for m in mutants:
        missing = {"file", "find", "replace", "tests"} - set(m)
        if missing:
            raise SystemExit(f"error: {path}: mistake {m['name']!r} lacks {', '.join(sorted(missing))}")
    return mutants


def copy_repo(dest):
    """The repository's files (not its environment, data or outputs) copied to `dest`."""
    def ignored(folder, names):
        return [n for n in names if n == "__pycache__" or (Path(folder) == REPO and n in SKIP)]
    shutil.copytree(REPO, dest, ignore=ignored)
    return dest


def failures(output):
    """The failing tests of a pytest run's output, as one phrase."""
    found = re.findall(r"^(?:FAILED|ERROR) (\S+)", output, re.M)
    if not found:
        return "the test run (no test named)"
    return found[0] + (f" and {len(found) - 1} more: {', '.join(f.split('::')[-1] for f in found[1:])}"
                       if len(found) > 1 else "")


def check(mutant, workspace):
    """Apply one mistake in `workspace`, run its tests, restore the file: (verdict, detail)."""
    target = workspace / mutant["file"]
    original = target.read_text()
    if original.count(mutant["find"]) != 1:
        return "STALE", f"{mutant['file']} holds the piece {original.count(mutant['find'])} times, not once"
    target.write_text(original.replace(mutant["find"], mutant["replace"]))
    try:
        env = dict(os.environ, TEST_TORCH_THREADS="1", OMP_NUM_THREADS="1")
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              *mutant["tests"].split()], cwd=workspace, env=env, capture_output=True, text=True)
    finally:
        target.write_text(original)
    if run.returncode == 0:
        return "SURVIVED", f"{mutant['tests']} passed"
    return "caught", failures(run.stdout + run.stderr)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", default="", help="only the mistakes whose name contains this text")
    parser.add_argument("--workers", type=int, default=2, help="mistakes checked at once (default: 2)")
    args = parser.parse_args(argv)
    mutants = [m for m in read_mutants() if args.k.lower() in m["name"].lower()]
    with tempfile.TemporaryDirectory() as tmp:
        spaces = [copy_repo(Path(tmp) / f"copy{i}") for i in range(max(1, args.workers))]
        free = list(spaces)

        def one(mutant):
            space = free.pop()
            try:
                return mutant, check(mutant, space)
            finally:
                free.append(space)

        caught = 0
        with ThreadPoolExecutor(len(spaces)) as pool:
            for mutant, (verdict, detail) in pool.map(one, mutants):
                caught += verdict == "caught"
                print(f"{verdict:8s} {mutant['name']}: {detail}", flush=True)
    print(f"caught {caught} of {len(mutants)}")
    return 0 if caught == len(mutants) else 1


if __name__ == "__main__":
    sys.exit(main())
