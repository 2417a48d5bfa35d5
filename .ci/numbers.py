"""Every experiment's numbers at two commits, compared: a refactoring must leave them identical.

    python .ci/numbers.py run REV DIR          # every experiment at commit REV (a temporary worktree) into DIR
    python .ci/numbers.py run . DIR            # ... in the working tree as it is, uncommitted changes included
    python .ci/numbers.py compare DIR_A DIR_B  # table of what differs; exit 1 if anything does
    python .ci/numbers.py REV_A REV_B          # both runs into a temporary folder, then the comparison

Each experiment runs with small options (the report's quick configurations, plus the default
``experiments.sweep`` at the book's full protocol) on the bundled data, with this interpreter. Compared:
every metric array, the verdict, the summary and every other result field, exactly (NaN equals NaN). Left
out: what describes the run rather than its numbers (options, engine settings, arm records, prose notes,
timing, environment), which a refactoring may rename.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name -> (module, options). Options every module shares are added by ``run``.
RUNS = {
    "sweep": ("experiments.sweep", []),
    "sweep_heldout_adam": ("experiments.sweep", ["--num-scales", "4", "--epochs", "3", "--num-seeds", "2",
                                                 "--optimizer", "adam", "--heldout-size", "300",
                                                 "--train-size", "300"]),
    "learning_rate": ("experiments.learning_rate", ["--lrs", "0.01,1", "--epochs", "3", "--num-seeds", "2",
                                                    "--train-size", "200", "--probe-steps", "4"]),
    "init": ("experiments.init", ["--scales", "0.1,0.01", "--epochs", "3", "--num-seeds", "2",
                                  "--train-size", "200"]),
    "overfitting": ("experiments.overfitting", ["--train-size", "100", "--epochs", "7", "--record-every", "3",
                                                "--num-seeds", "2"]),
    "activations": ("experiments.activations", ["--train-size", "200", "--epochs", "2", "--num-scales", "3"]),
    "small_batch": ("experiments.small_batch", ["--batch-sizes", "2,10", "--reference-batch", "10", "--epochs", "2",
                                                "--num-seeds", "2", "--train-size", "100", "--renorm-warmup", "0.5"]),
}
COMMON = ["--data", "bundled", "--no-cache", "--quiet", "--no-plot"]
# Fields that describe a run, not its numbers.
SKIP = {"config", "grid", "arms", "notes", "timing", "environment"}


def run(rev: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tree = ROOT if rev == "." else Path(tmp) / "tree"
        if rev != ".":
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev], check=True,
                           capture_output=True)
        try:
            env = dict(os.environ, PYTHONPATH=str(tree))
            env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                        if "xla_force_host_platform_device_count" not in f)
            for name, (module, opts) in RUNS.items():
                print(f"{rev[:12]}: {name} ...", file=sys.stderr, flush=True)
                # A folder that holds a run is refused (the output-folder contract): start each run afresh, in a
                # way every revision understands (older ones have no --overwrite).
                shutil.rmtree(out / name, ignore_errors=True)
                r = subprocess.run([sys.executable, "-m", module, *opts, *COMMON, "--out", str(out / name)],
                                   cwd=tree, env=env, capture_output=True, text=True)
                if r.returncode != 0:
                    sys.exit(f"{name} failed at {rev}:\n{r.stderr[-2000:]}")
        finally:
            if rev != ".":
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False,
                               capture_output=True)


def _differences(a, b, path: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}/{k}: only in one" for k in sorted(set(a) ^ set(b))]
        for k in a:
            if k in b:
                out += _differences(a[k], b[k], f"{path}/{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    return [] if a == b and type(a) is type(b) else [f"{path}: {a!r} != {b!r}"]


def _count(value) -> int:
    if isinstance(value, dict):
        return sum(_count(v) for v in value.values())
    if isinstance(value, list):
        return sum(_count(v) for v in value)
    return 1


def compare(dir_a: Path, dir_b: Path) -> int:
    print("| run | fields compared | numbers compared | differences |\n|---|---|---|---|")
    failed = 0
    for name in RUNS:
        a = json.loads((dir_a / name / "results.json").read_text())
        b = json.loads((dir_b / name / "results.json").read_text())
        a = {k: v for k, v in a.items() if k not in SKIP}
        b = {k: v for k, v in b.items() if k not in SKIP}
        diffs = _differences(a, b, "")
        failed += bool(diffs)
        print(f"| {name} | {len(a)} | {_count(a)} | {len(diffs) or 'none (identical)'} |")
        for d in diffs[:20]:
            print(f"    {d}")
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    """``run REV DIR``, ``compare DIR_A DIR_B`` or ``REV_A REV_B``; returns the exit status."""
    if len(argv) == 3 and argv[0] == "run":
        run(argv[1], Path(argv[2]))
        return 0
    if len(argv) == 3 and argv[0] == "compare":
        return compare(Path(argv[1]), Path(argv[2]))
    if len(argv) == 2:
        with tempfile.TemporaryDirectory() as tmp:
            run(argv[0], Path(tmp) / "a")
            run(argv[1], Path(tmp) / "b")
            return compare(Path(tmp) / "a", Path(tmp) / "b")
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
