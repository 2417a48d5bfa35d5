"""Hostile invocations of every experiment: each bad option exits 2 naming the option, with no traceback and
nothing written; failures after parsing (backend, data sizes, dtype ranges, memory, a corrupt cache, a full disk,
a garbage XLA_FLAGS) end in one line and leave no folder; the output-folder contract (a folder holding a run is
refused unless --overwrite or --resume, a concurrent run fails at once, a dead run's lock never blocks);
interrupts at compile time and mid-run leave an interrupted run's chunks byte-identical and no temporary file."""

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments import outputs, registry
from helpers import ROOT, cli_env, run_cli

# Every experiment takes these (cli.add_common_args).
COMMON = [
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**31)], "--seed"),
    (["--seed", str(2**31 - 1), "--num-seeds", "2"], "--seed"),
    (["--num-seeds", "0"], "--num-seeds"),
    (["--num-seeds", "1e6"], "--num-seeds"),
    (["--num-seeds", "2000000"], "--num-seeds"),
    (["--split-seed", "-3"], "--split-seed"),
    (["--train-size", "0"], "--train-size"),
    (["--train-size", "x"], "--train-size"),
    (["--train-size", "100000000"], "--train-size"),
    (["--data", "imagenet"], "--data"),
    (["--data-dir", "/nonexistent-bnjax-test/mnist"], "--data-dir"),
    (["--data", "bundled", "--data-dir", "."], "--data-dir"),
    (["--out", ""], "--out"),
    (["--out", "/proc/bnjax-cannot-write-here"], "--out"),
    (["--cpu-devices", "100000"], "--cpu-devices"),
    (["--cpu-devices", "0"], "--cpu-devices"),
    (["--max-models-per-chunk", "0"], "--max-models-per-chunk"),
    (["--coordinator", "host"], "--coordinator"),
    (["--coordinator", "h:1"], "--coordinator"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"], "--process-id"),
    (["--no-such-option"], "--no-such-option"),
]

SPECIFIC = {
    "sweep": [(["--scales", "0.1,0.01,1e-1"], "--scales"), (["--resume", "--overwrite"], "--resume"),
              (["--resume", "--coordinator", "h:1", "--num-processes", "2", "--process-id", "0"], "--resume"),
              (["--lr", "1e-320"], "--lr"), (["--lr", "1e308"], "--lr"), (["--lr", "0"], "--lr"),
              (["--lr", "nan"], "--lr"), (["--scales", "1e-320"], "--scales"), (["--scales", "0.1,,x"], "--scales"),
              (["--scales", "0.1", "--num-scales", "3"], "--num-scales"), (["--epochs", "0"], "--epochs"),
              (["--epochs", "1e9"], "--epochs"), (["--num-scales", "100000"], "--num-scales"),
              (["--batch-size", "0"], "--batch-size"), (["--batch-size", "1000000000"], "--batch-size"),
              (["--optimizer", "sgdd"], "--optimizer"), (["--dtype", "int8"], "--dtype"),
              (["--heldout-size", "0"], "--heldout-size"),
              (["--data", "bundled", "--train-size", "4500", "--heldout-size", "600"], "--train-size")],
    "learning_rate": [(["--lrs", "0.1,0"], "--lrs"), (["--lrs", "0.1,0.3,0.1"], "--lrs"), (["--init-scale", "nan"], "--init-scale"),
                      (["--probe-lr", "-1"], "--probe-lr"), (["--num-lrs", "100000"], "--num-lrs"),
                      (["--probe-steps", "1"], "--probe-steps"), (["--epochs", "1"], "--epochs")],
    "init": [(["--scales", "0.01,1e-2"], "--scales"), (["--lr", "inf"], "--lr"), (["--scales", ","], "--scales"), (["--num-scales", "0"], "--num-scales")],
    "overfitting": [(["--dropout-ratio", "1"], "--dropout-ratio"), (["--dropout-ratio", "nan"], "--dropout-ratio"),
                    (["--weight-decay", "0"], "--weight-decay"), (["--record-every", "500"], "--record-every"),
                    (["--epochs", "1"], "--epochs"), (["--data", "bundled", "--train-size", "5000"], "--train-size")],
    "activations": [(["--num-inputs", "1"], "--num-inputs"), (["--num-scales", "0"], "--num-scales"),
                    (["--epochs", "0"], "--epochs")],
    "small_batch": [(["--batch-sizes", "1,4"], "--batch-sizes"), (["--batch-sizes", "4,x"], "--batch-sizes"),
                    (["--batch-sizes", "4,4"], "--batch-sizes"), (["--batch-sizes", "0"], "--batch-sizes"),
                    (["--batch-sizes", "2000"], "--batch-sizes"), (["--reference-batch", "1"], "--reference-batch"),
                    (["--reference-batch", "5000"], "--reference-batch"), (["--r-max", "0.5"], "--r-max"),
                    (["--r-max", "inf"], "--r-max"), (["--d-max", "-1"], "--d-max"),
                    (["--renorm-warmup", "1.5"], "--renorm-warmup"), (["--momentum", "2"], "--momentum"),
                    (["--momentum", "nan"], "--momentum"), (["--renorm-momentum", "-0.1"], "--renorm-momentum"),
                    (["--lr", "0"], "--lr"), (["--epochs", "1"], "--epochs"),
                    (["--data", "bundled", "--train-size", "5000"], "--train-size"),
                    (["--batch-sizes", "2,20", "--reference-batch", "10"], "--batch-sizes"),
                    (["--d-max", "nan"], "--d-max"), (["--renorm-warmup", "-0.5"], "--renorm-warmup")],
}
REPORT = [(["--only", "sweepz"], "--only"), (["--only", ""], "--only"), (["--only", "init,init"], "--only"),
          (["--reuse", "--overwrite"], "--overwrite"), (["--resume", "--overwrite"], "--overwrite"), (["--seed", "-1"], "--seed"),
          (["--out", ""], "--out"), (["--data", "x"], "--data"), (["--data-dir", "/nonexistent-bnjax-test"], "--data-dir"),
          (["--cpu-devices", "0"], "--cpu-devices")]

def test_every_registered_experiment_has_its_hostile_cases():
    assert set(SPECIFIC) == set(registry.NAMES)


CASES = [(name, bad, option) for name in registry.NAMES for bad, option in COMMON + SPECIFIC[name]]
CASES += [("report", bad, option) for bad, option in REPORT]


@pytest.mark.parametrize("name,bad,option", CASES, ids=[f"{n}:{' '.join(b)}" for n, b, _ in CASES])
def test_bad_option_exits_2_naming_it_and_writes_nothing(name, bad, option, tmp_path, capsys, monkeypatch):
    module = importlib.import_module(f"experiments.{name}")
    monkeypatch.chdir(tmp_path)  # a run that wrongly starts writes here, where the last assertion sees it
    never = tmp_path / "never"
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--out", str(never), *bad])  # a later --out in ``bad`` wins
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert option in err and "Traceback" not in err
    assert not never.exists() and list(tmp_path.iterdir()) == []


def _no_traceback_one_error(err: str) -> None:
    assert "Traceback" not in err and "Warning" not in err, err[-2000:]
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1, err[-2000:]


TINY = ["--scales", "0.1", "--epochs", "2", "--train-size", "200", "--no-cache", "--no-plot", "--quiet"]


@pytest.mark.slow
def test_missing_backend_is_one_line_and_leaves_no_directory(tmp_path):
    r = run_cli("experiments.sweep", *TINY, "--out", str(tmp_path / "run"), JAX_PLATFORMS="cuda")
    assert r.returncode == 1
    _no_traceback_one_error(r.stderr)
    assert "'cuda'" in r.stderr and "JAX_PLATFORMS" in r.stderr and "jaxlib" in r.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_sizes_the_auto_data_cannot_supply_exit_2_like_bundled(tmp_path):
    # An empty data directory: auto falls back to the 5,000 bundled images.
    empty = tmp_path / "data"
    empty.mkdir()
    for source in ("auto", "bundled"):
        r = run_cli("experiments.sweep", *TINY, "--data", source, "--train-size", "6000", "--out",
                 str(tmp_path / source), BNJAX_DATA_DIR=str(empty))
        assert r.returncode == 2, (source, r.stderr)
        assert "--train-size" in r.stderr and "Traceback" not in r.stderr
        assert not (tmp_path / source).exists()


@pytest.mark.slow
def test_a_scale_the_dtype_cannot_hold_exits_2(tmp_path):
    r = run_cli("experiments.sweep", *TINY[2:], "--scales", "0.00001", "--dtype", "float16", "--data", "bundled",
             "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and "--scales" in r.stderr and "float16" in r.stderr
    _no_traceback_one_error(r.stderr)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_memory_preflight_refuses_what_cannot_fit_in_one_line(tmp_path):
    t0 = time.time()
    r = run_cli("experiments.sweep", "--num-seeds", "1000000", "--epochs", "100000", "--data", "bundled", "--no-cache",
             "--quiet", "--out", str(tmp_path / "run"))
    assert r.returncode == 1 and "GiB" in r.stderr and "--num-seeds" in r.stderr
    _no_traceback_one_error(r.stderr)
    assert time.time() - t0 < 120 and not (tmp_path / "run").exists()


def test_memory_problem_counts_chunks_and_results():
    from bnjax import grid
    from experiments import memory

    small = grid.GridConfig()
    assert memory.memory_problem(small, 784, 1000, 0) is None
    host = grid.GridConfig(num_seeds=10**6, num_records=10**5)
    assert "--num-seeds" in memory.memory_problem(host, 784, 1000, 0)
    # one huge model per chunk: the batch activations alone exceed any machine
    wide = grid.GridConfig(batch_size=10**9, max_models_per_chunk=1)
    assert "--batch-size" in memory.memory_problem(wide, 784, 1000, 0)


@pytest.mark.slow
def test_a_corrupt_compilation_cache_entry_is_replaced_once(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    args = [*TINY[:-3], "--no-plot", "--quiet", "--data", "bundled"]
    assert run_cli("experiments.sweep", *args, "--out", str(tmp_path / "a"), **env).returncode == 0
    entries = [p for p in (tmp_path / "cache" / "bnjax" / "jax-compilation-cache").iterdir() if p.is_file()]
    assert entries
    for p in entries:
        p.write_bytes(b"garbage")
    r = run_cli("experiments.sweep", *args, "--out", str(tmp_path / "b"), **env)
    assert r.returncode == 0 and "replaced" in r.stderr and "Warning" not in r.stderr
    again = run_cli("experiments.sweep", *args, "--out", str(tmp_path / "c"), **env)
    assert again.returncode == 0 and again.stderr == ""
    first = json.loads((tmp_path / "a" / "results.json").read_text())
    assert json.loads((tmp_path / "c" / "results.json").read_text())["train_accuracy"] == first["train_accuracy"]


@pytest.mark.slow
def test_matplotlib_gets_a_writable_config_dir():
    # As if HOME were unwritable (os.access says so until the directory is chosen; this test runs as root).
    code = ("import os; real = os.access; os.access = lambda path, mode: False\n"
            "from experiments import plot; plot._config_dir(); os.access = real\n"
            "plot.pyplot(); print(os.environ['MPLCONFIGDIR'])")
    env = cli_env()
    env.pop("MPLCONFIGDIR", None)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "bnjax-matplotlib-" in r.stdout and "Traceback" not in r.stderr and "Matplotlib" not in r.stderr


INIT = ["experiments.init", "--scales", "0.1,0.01", "--epochs", "30", "--num-seeds", "64", "--train-size", "200",
        "--data", "bundled", "--no-cache", "--max-models-per-chunk", "16"]  # 16 chunks of 16 models, ~1-3 s each


def _chunk_files(out) -> dict:
    return {p.name: p.read_bytes() for p in (out / "chunks").iterdir()}


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory):
    """The folder of an init run stopped (SIGTERM) once its first chunk was written; each test works on a copy."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    proc = subprocess.Popen([sys.executable, "-m", *INIT, "--out", str(out), "--quiet"], cwd=ROOT, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "chunks" / "chunk-0-0.npz").exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "kept in" in err and "--resume" in err  # the last line says what is left to resume from
    assert sorted(p.name for p in out.iterdir()) == ["chunks"]  # no lock, no temporary file
    return out


@pytest.mark.slow
@pytest.mark.parametrize("when", ["compile", "run"])
@pytest.mark.parametrize("sig,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_keeps_earlier_chunks_byte_identical(tmp_path, interrupted_run, when, sig, status):
    from experiments import chunks

    out = tmp_path / "run"
    shutil.copytree(interrupted_run, out)
    before = _chunk_files(out)
    assert chunks.chunk_path(out, (0, 0)).name in before
    proc = subprocess.Popen([sys.executable, "-m", *INIT, "--out", str(out), "--resume"], cwd=ROOT, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and "compiling" not in (proc.stdout.readline() or ""):
        pass
    time.sleep(0.2 if when == "compile" else 3.0)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err[-2000:]
    assert "Traceback" not in err and len(err.strip().splitlines()[-1:]) == 1
    assert sorted(p.name for p in out.iterdir()) == ["chunks"]  # no temporary file, no lock, no results
    after = _chunk_files(out)
    assert {name: after[name] for name in before} == before  # the earlier chunks are untouched ...
    for name in after:  # ... and any new one is whole
        assert name.startswith("chunk-") and name.endswith(".npz")
        with np.load(out / "chunks" / name) as z:
            assert "head" in z.files


def test_a_folder_holding_a_run_is_refused_in_one_line_unless_overwrite_or_resume(tmp_path, capsys):
    """Finding 1: a run into a folder holding results silently replaced them (and kept the old figure)."""
    from experiments import sweep

    def refused(*extra: str) -> str:
        with pytest.raises(SystemExit) as exit_info:
            sweep.main(["--out", str(out), "--data", "bundled", *extra])
        assert exit_info.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in lines[0]
        return lines[0]

    out = tmp_path / "run"
    out.mkdir()
    (out / "sweep.png").write_bytes(b"old figure")  # a run's figure alone is enough
    assert refused() == (f"error: --out {out} already holds a run's files (sweep.png); use --overwrite to replace "
                         "that run, or choose another --out")
    (out / "results.json").write_text("{}")
    assert "already holds a run's files (results.json, sweep.png)" in refused()
    assert "holds a finished run (results.json); nothing to resume" in refused("--resume")
    for name in ("results.json", "sweep.png"):
        (out / name).unlink()
    (out / "chunks").mkdir()
    assert "holds an interrupted run (its finished chunks); use --resume to continue it" in refused()
    assert sorted(p.name for p in out.iterdir()) == ["chunks"]  # nothing was touched


def test_a_locked_folder_is_refused_at_once_and_a_dead_runs_lock_never_blocks(tmp_path, capsys):
    from experiments import sweep

    out = tmp_path / "run"
    claimed = outputs.claim(out, overwrite=False, resume=False)  # as a run in progress does
    try:
        assert (out / outputs.LOCK).read_text().split()[0] == str(os.getpid())
        t0 = time.time()
        with pytest.raises(SystemExit) as exit_info:
            sweep.main(["--out", str(out), "--data", "bundled", "--overwrite"])
        assert exit_info.value.code == 2 and time.time() - t0 < 5
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: --out {out} is in use by another run (pid {os.getpid()} on {os.uname().nodename}); "
                       "wait for it to end or choose another --out"]
        with pytest.raises(outputs.OutputError, match="in use"):
            outputs.claim(out, overwrite=False, resume=False)
    finally:
        outputs.release(claimed)
    assert not (out / outputs.LOCK).exists()
    # A run killed with -9 leaves its lock file, naming a dead process: it blocks nothing.
    (out / outputs.LOCK).write_text("999999999 " + os.uname().nodename + "\n")
    assert outputs.lock_holder(out) is None
    outputs.check_folder(out, overwrite=False, resume=False)
    claimed = outputs.claim(out, overwrite=False, resume=False)
    assert (out / outputs.LOCK).read_text().split()[0] == str(os.getpid())
    outputs.release(claimed)
    assert list(out.iterdir()) == []


@pytest.mark.slow
def test_overwrite_removes_the_old_runs_files_figures_included(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text('{"old": true}')
    (out / "sweep.png").write_bytes(b"old figure")
    (out / "chunks").mkdir()
    (out / "chunks" / "chunk-0-0.npz").write_bytes(b"old chunk")
    (out / "notes.txt").write_text("the user's own file")
    r = run_cli("experiments.sweep", *TINY, "--data", "bundled", "--overwrite", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "results.json"]  # --no-plot: no old figure
    assert "train_accuracy" in json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_a_second_run_into_the_same_folder_fails_at_once(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", *INIT, "--out", str(out)], cwd=ROOT, env=cli_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and "compiling" not in (first.stdout.readline() or ""):
            pass
        t0 = time.time()
        second = run_cli(*INIT, "--out", str(out), "--resume")
        assert second.returncode == 2 and time.time() - t0 < 60
        assert second.stderr.strip().splitlines() == [
            f"error: --out {out} is in use by another run (pid {first.pid} on {os.uname().nodename}); wait for it "
            "to end or choose another --out"]
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 143


@pytest.mark.slow
def test_a_garbage_xla_flags_leaves_no_folder(tmp_path):
    r = run_cli("experiments.sweep", *TINY, "--data", "bundled", "--out", str(tmp_path / "a" / "run"),
                XLA_FLAGS="--bnjax_no_such_flag=1")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


DISK_FULL = """
import builtins, sys
import bnjax.files

def full(path, mode="r", *args, **kwargs):  # every atomic write lands on /dev/full: the kernel says ENOSPC
    return builtins.open("/dev/full" if "w" in mode else path, mode, *args, **kwargs)

bnjax.files.open = full
from experiments import runtime, sweep
sys.exit(runtime.main_wrapper(sweep.main))
"""


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-c", DISK_FULL, *TINY, "--data", "bundled", "--out", str(out)], cwd=ROOT,
                       env=cli_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]
    _no_traceback_one_error(r.stderr)
    assert f"cannot write {out / 'chunks' / 'chunk-0-0.npz'}: No space left on device" in r.stderr
    assert list(tmp_path.iterdir()) == []  # no partial file, no lock, no empty folder


SWALLOWED = """
import gc, os, signal, sys, time
from experiments import runtime

class Collected:
    def __del__(self):  # as JAX's callback on every garbage collection: an exception here is only printed
        os.kill(os.getpid(), signal.{sig})
        time.sleep(0.05)  # the handler runs here, inside __del__

def main(argv):
    Collected()
    for _ in range(40):
        time.sleep(0.05)
    print("ran to the end")
    return 0

runtime.main_wrapper(main, [])
"""


@pytest.mark.parametrize("sig,status", [("SIGINT", 130), ("SIGTERM", 143)])
def test_an_interrupt_landing_in_a_gc_callback_still_ends_the_run(sig, status):
    """Seen when Ctrl-C arrived during a compile: the KeyboardInterrupt was raised inside JAX's gc callback,
    printed as "Exception ignored" and lost, and the run went on for minutes."""
    proc = subprocess.run([sys.executable, "-c", SWALLOWED.format(sig=sig)], cwd=ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == status, proc.stderr[-2000:]
    assert "ran to the end" not in proc.stdout and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_failed_report_leaves_no_nested_directory(tmp_path):
    r = run_cli("experiments.report", "--quick", "--no-cache", "--out", str(tmp_path / "r" / "deep"), JAX_PLATFORMS="cuda")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content", ["null", "[]", "{}", '{"verdict": {}}', '{"verdict": {"per_scale": 3}}'])
def test_report_refuses_results_that_are_not_an_experiments(tmp_path, content, capsys):
    from experiments import report

    (tmp_path / "init").mkdir()
    (tmp_path / "init" / "results.json").write_text(content)
    assert report.main(["--reuse", "--only", "init", "--quiet", "--out", str(tmp_path)]) == 1  # no exception
    err = capsys.readouterr().err
    assert "cannot read" in err and str(tmp_path / "init" / "results.json") in err
    assert not (tmp_path / "report.md").exists()


def test_default_output_folders_never_collide(tmp_path, monkeypatch):
    from experiments import cli

    monkeypatch.chdir(tmp_path)
    chosen = [cli.default_out("sweep") for _ in range(3)]  # within one second: nothing is created yet ...
    assert not (tmp_path / "runs").exists()
    folders = {outputs.claim(c, overwrite=False, resume=False, fresh=cli.is_default_out(c)) for c in chosen}
    assert len(folders) == 3 and all(f.is_dir() for f in folders)  # ... each run creates its own
    cli.remove_empty_outputs()
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_closed_pipe_ends_quietly(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "experiments.sweep", *TINY[:-1], "--data", "bundled", "--out",
                             str(tmp_path / "run")], cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # as `| head -0` does
    err = proc.stderr.read()
    proc.wait(timeout=120)
    assert proc.returncode in (0, 1) and "Traceback" not in err and "BrokenPipe" not in err


@pytest.mark.slow
def test_library_refuses_values_its_float32_statistics_cannot_hold():
    import numpy as np

    from bnjax import claims, grid, layers, model

    params, state = layers.batch_norm_init(3)
    x = np.ones((4, 3), np.float32)
    for eps in (1e-320, 1e300):
        with pytest.raises(ValueError, match="eps"):
            layers.batch_norm_apply(params, state, x, train=True, eps=eps)
        with pytest.raises(ValueError, match="eps must be > 0 and within float32's range"):
            model.MLPConfig(norm=layers.batch_norm(eps=eps)).check()
    with pytest.raises(ValueError, match="momentum must be a scalar"):
        layers.batch_norm_apply(params, state, x, train=True, momentum=np.array([[0.9]]))
    assert claims.sign_test(3000, 3000) == 1.0  # no float overflow past 1024 pairs
    # normal approximation with continuity: z = (2800.5 - 2900) / (sqrt(5800) / 2) = -2.613, p = 2 Phi(z)
    assert claims.sign_test(3000, 2800) == pytest.approx(0.00897, rel=0.01)
    with pytest.raises(ValueError, match="counts"):
        claims.sign_test(-1, 5)
    for change, field in [({"num_records": 2.5}, "num_records"), ({"seed": 1.5}, "seed"),
                          ({"batch_size": True}, "batch_size"), ({"matmul_precision": "bogus"}, "matmul_precision"),
                          ({"arms": {"a": grid.Arm(norm="no")}}, "norm"),
                          ({"arms": {"a": grid.Arm(init_stream=True)}}, "init_stream"),
                          ({"bn_momentum": 2.0}, "bn_momentum"),
                          ({"dtype": "float16", "learning_rate": 1e5}, "learning_rate")]:
        with pytest.raises(ValueError, match=field):
            grid.GridConfig(**change).validate()


def test_a_disk_too_full_for_the_lock_leaves_no_lock_and_no_folder(tmp_path, monkeypatch):
    """Found by the probe table: with 0 bytes free, the lock file's pid record failed and the empty ``.lock``
    (and the folder made for it) stayed behind."""
    import errno

    from experiments import outputs

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs.os, "write", full)
    out = tmp_path / "new" / "run"
    with pytest.raises(OSError, match="No space left"):
        outputs.claim(out, overwrite=False, resume=False)
    monkeypatch.undo()
    assert not (out / outputs.LOCK).exists()
    outputs.remove_empty_created()
    assert list(tmp_path.iterdir()) == []
    assert outputs.claim(out, overwrite=False, resume=False) == out  # nothing held: the next run may lock it
    outputs.release_all()


CAUGHT_BY_A_LIBRARY = """
import os, signal, time
from experiments import runtime

def main(argv):
    try:  # as a library's ``except BaseException`` would: the interrupt is swallowed
        os.kill(os.getpid(), signal.{sig})
        time.sleep(0.2)
    except BaseException:
        pass
    runtime.Progress(False)(1, 2)  # the next progress step of the engine
    print("ran to the end")
    return 0

runtime.main_wrapper(main, [])
"""


@pytest.mark.parametrize("sig,status", [("SIGINT", 130), ("SIGTERM", 143)])
def test_an_interrupt_swallowed_by_a_library_ends_the_run_at_the_next_step(sig, status):
    """Seen in CI: Ctrl-C during a compile was lost (the run trained to the end and exited 0)."""
    proc = subprocess.run([sys.executable, "-c", CAUGHT_BY_A_LIBRARY.format(sig=sig)], cwd=ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == status, proc.stderr[-2000:]
    assert "ran to the end" not in proc.stdout and "Traceback" not in proc.stderr
