"""Helpers the test modules share: running a command-line module as a user would, and reading what it wrote.

Imported as ``from helpers import run_cli, cli_env, read_results`` (pytest puts ``tests/`` on the path). A test
module never imports helpers from another test module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cli_env(**extra: str) -> dict:
    """The environment of a command run by a test: this checkout first on the path, plus ``extra``.

    conftest.py gives the test process 4 emulated CPU devices; that flag must not leak into a command, which
    chooses its own device count (``--cpu-devices``), so it is removed here.
    """
    env = dict(os.environ, PYTHONPATH=str(ROOT), **extra)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "xla_force_host_platform_device_count" not in f)
    return env


def run_cli(module: str, *args: str, timeout: float = 300, cwd: str | os.PathLike = ROOT,
            **env: str) -> subprocess.CompletedProcess:
    """``python -m module args...`` in a fresh process; returns the completed process (text output captured)."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=cli_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def read_results(directory: str | os.PathLike) -> dict:
    """The ``results.json`` an experiment wrote into ``directory``."""
    return json.loads((Path(directory) / "results.json").read_text())


def run_quick(name: str, out: str | os.PathLike) -> subprocess.CompletedProcess:
    """``python -m experiments.<name>`` at the registry's quick options (figures drawn) into ``out``, on 2 devices,
    with the session's compilation cache (conftest.py)."""
    from experiments import registry

    return run_cli(f"experiments.{name}", *registry.experiment(name).quick, "--data", "bundled",
                   "--cpu-devices", "2", "--out", out)


def assert_quick_run(name: str, proc: subprocess.CompletedProcess, out: str | os.PathLike) -> dict:
    """What every experiment's quick run must do: exit 0, record a verdict, print its rendering (what the report
    quotes) and the files written, and write exactly results.json and its figures. Returns the results."""
    from experiments import registry

    experiment = registry.experiment(name)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = read_results(out)
    assert res["verdict"]
    rendered = experiment.render(res)
    assert rendered.strip() and rendered.strip() in proc.stdout  # the console shows what the report quotes
    assert f"wrote results.json, {', '.join(experiment.figure_files)} to {out}" in proc.stdout
    assert sorted(p.name for p in Path(out).iterdir()) == sorted(["results.json", *experiment.figure_files])
    return res


def reference_keys(seed, num_arms, num_scales, num_updates, batch, num_train):
    """The grid engine's keys re-derived from the documented scheme (docs/engine.md), for models trained alone:
    ``key(seed)`` split into a data and an init key, the init keys split ``[arms, weight scales]``, the batches
    ``randint(data_key, [updates, batch], 0, num_train)``. Returns ``(init_keys, batch indices as NumPy)``."""
    import jax
    import numpy as np

    data_key, init_key = jax.random.split(jax.random.key(seed))
    init_keys = jax.random.split(init_key, (num_arms, num_scales))
    batches = np.asarray(jax.random.randint(data_key, (num_updates, batch), 0, num_train))
    return init_keys, batches
