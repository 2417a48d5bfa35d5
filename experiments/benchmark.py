"""Benchmark: the book's sweep as one compiled program against the obvious alternatives, side by side.

Variants, all on the same data and protocol (the bundled MNIST subset, 1000 training images, 191 updates and
20 records per model, 16 scales x BN/plain by default):

  (a) bnjax's sweep: every model in one jitted, vmapped program (bnjax.sweep.run_sweep)
  (b) the same jitted train step, looping over the models (and steps) in Python
  (c) the book's network in NumPy, float64, as the book runs it (all BLAS threads, and one BLAS thread)
  (d) Flax linen + optax, one model at a time, with one compile per structure (if flax is installed)

Reports compile and run time separately, each variant's run-time ratio to (a), and achieved GFLOP/s
(matmul FLOPs counted by bnjax.sweep.sweep_flops) against a float32 matmul peak measured in the same run.

Then a scaling table of the grid engine: the book's sweep with more seeds (32, 256, 1024 models; 4096 too on an
accelerator), each in a fresh process, reporting model-updates per second, GFLOP/s, the per-model cost
relative to the 32-model run, the chunks used, and peak memory (host RSS; device memory on an accelerator).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 scales x 2 records: checks that every variant runs")
    p.add_argument("--repeats", type=int, default=3, help="runs of (a) to take the median of (default: 3)")
    p.add_argument("--skip", default="", help="comma-separated variants to skip, e.g. 'c,d'")
    p.add_argument("--scaling", default=None, metavar="N1,N2,...",
                   help="model counts of the scaling table, multiples of 32 (default: 32,256,1024 on CPU, "
                        "32,256,1024,4096 on an accelerator; 'none' to skip)")
    p.add_argument("--scaling-one", type=int, help=argparse.SUPPRESS)  # internal: one scaling point, JSON out
    p.add_argument("--out", type=Path, default=Path("runs") / "benchmark.json", help="JSON output path")
    return p


def measure_peak_gflops(n: int | None = None, repeats: int = 5) -> dict:
    """Median float32 GFLOP/s of a large jitted square matmul on the default device."""
    import jax
    import jax.numpy as jnp

    n = n or (8192 if jax.default_backend() != "cpu" else 2048)
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    mm = jax.jit(lambda x, y: jnp.matmul(x, y, precision="highest"))  # true float32, as the sweep
    mm(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mm(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return {"n": n, "gflops": 2 * n**3 / statistics.median(times) / 1e9}


def bench_sweep(config, x, t, repeats: int) -> dict:
    from bnjax import sweep

    runs = [sweep.run_sweep(config, x, t, keep_final=False) for _ in range(repeats)]
    return {
        "compile_s": runs[0].timing["compile_s"],  # the first is the cold compile
        "run_s": statistics.median(r.timing["run_s"] for r in runs),
        "final_batchnorm": runs[0].train_accuracy["batchnorm"][0, :, -1].tolist(),
        "final_plain": runs[0].train_accuracy["plain"][0, :, -1].tolist(),
    }


def _one_model_at_a_time(config, x, t, make) -> dict:
    """Compile per network structure, then train the models one by one, step by step, from Python.

    ``make(use_bn, xd, td, example_batch)`` returns compiled ``init(key, scale) -> state``,
    ``step(state, xb, tb) -> state`` and ``accuracy(state) -> scalar`` (on ``xd``, ``td``). Every model gets
    the sweep's init keys and batches.
    """
    import jax.numpy as jnp

    from bnjax import sweep

    num_train = x.shape[0]
    init_keys, batch_idx = book_keys_and_batches(config, num_train)
    steps_at = set(sweep.record_steps(config, num_train).tolist())
    xd, td = jnp.asarray(x), jnp.asarray(t)
    batches = [(xd[i], td[i]) for i in batch_idx]  # gathered up front: the loop times the steps alone

    t0 = time.perf_counter()
    compiled = {use_bn: make(use_bn, xd, td, batches[0]) for use_bn in (True, False)}
    compile_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    finals = {True: [], False: []}
    for v, use_bn in enumerate((True, False)):
        init_c, step_c, acc_c = compiled[use_bn]
        for i, scale in enumerate(config.weight_scales):
            state = init_c(init_keys[v, i], jnp.float32(scale))
            last = None
            for u, (xb, tb) in enumerate(batches):
                state = step_c(state, xb, tb)
                if u + 1 in steps_at:
                    last = acc_c(state)
            finals[use_bn].append(float(last))
    run_s = time.perf_counter() - t0
    return {"compile_s": compile_s, "run_s": run_s, "final_batchnorm": finals[True], "final_plain": finals[False]}


def book_keys_and_batches(config, num_train: int):
    """Seed ``config.seed``'s init keys ``[arms, scales]`` and batch indices ``[updates, B]``, drawn as the
    engine draws them (``bnjax.sweep._seed_keys``), so every variant trains the same models."""
    import jax
    import numpy as np

    from bnjax import sweep

    data_key, init_keys, _ = sweep._seed_keys(config.seed, 2, len(config.weight_scales))
    shape = (sweep.num_updates(config, num_train), config.batch_size)
    return init_keys, np.asarray(jax.random.randint(data_key, shape, 0, num_train))


def bench_python_loop(config, x, t) -> dict:
    """(b): bnjax's own train step, jitted once per network structure, called model by model, step by step."""
    import jax
    import jax.numpy as jnp

    from bnjax import model, train

    opt = train.make_optimizer(config.optimizer, config.learning_rate)

    def make(use_bn, xd, td, batch):
        net = model.MLPConfig(xd.shape[1], tuple(config.hidden_sizes), config.num_classes, batch_norm=use_bn)

        def init(key, scale):
            params, state = model.init(key, net, scale)
            return train.train_state_init(params, state, opt)

        def step(ts, xb, tb):
            return train.train_step(net, ts, xb, tb, opt)[0]

        def acc(ts):
            return model.accuracy(net, ts.params, ts.state, xd, td)

        key, scale = jax.random.key(0), jnp.float32(1.0)
        ts = init(key, scale)
        return (jax.jit(init).lower(key, scale).compile(), jax.jit(step).lower(ts, *batch).compile(),
                jax.jit(acc).lower(ts).compile())

    return _one_model_at_a_time(config, x, t, make)


def bench_numpy(config, num_train: int, threads: int | None) -> dict:
    """(c): the NumPy network in a subprocess, so the BLAS thread count can be pinned before NumPy loads."""
    env = dict(os.environ)
    if threads is not None:
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "tests" / "numpy_book.py"), "--num-scales", str(len(config.weight_scales)),
           "--epochs", str(config.num_records), "--train-size", str(num_train)]
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, check=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"compile_s": 0.0, "run_s": out["run_s"], "final_batchnorm": out["final_batchnorm"],
            "final_plain": out["final_plain"]}


def bench_flax(config, x, t) -> dict | None:
    """(d): idiomatic Flax linen + optax, one model at a time.

    The scale is applied to the initialised kernels (not baked into the module), so each structure compiles
    once; Flax's BatchNorm starts its running variance at 1 (the book's at 0).
    """
    try:
        import flax.linen as nn
    except ImportError:
        return None
    import jax
    import jax.numpy as jnp
    import optax

    from bnjax.layers import CONVENTIONS

    class MLP(nn.Module):
        hidden: tuple
        use_bn: bool

        @nn.compact
        def __call__(self, h, train_flg: bool):
            for size in self.hidden:
                h = nn.Dense(size, kernel_init=nn.initializers.normal(1.0))(h)
                if self.use_bn:
                    h = nn.BatchNorm(use_running_average=not train_flg, momentum=CONVENTIONS["momentum"],
                                     epsilon=CONVENTIONS["eps"])(h)
                h = nn.relu(h)
            return nn.Dense(config.num_classes, kernel_init=nn.initializers.normal(1.0))(h)

    opt = optax.sgd(config.learning_rate)

    def make(use_bn, xd, td, batch):
        net = MLP(tuple(config.hidden_sizes), use_bn)

        def init(key, scale):
            variables = net.init(key, xd[:2], False)
            params = jax.tree_util.tree_map_with_path(
                lambda path, p: p * scale if "kernel" in jax.tree_util.keystr(path) else p, variables["params"])
            return params, variables.get("batch_stats", {}), opt.init(params)

        def step(state, xb, tb):
            params, stats, opt_state = state

            def loss_fn(p):
                if use_bn:
                    logits, upd = net.apply({"params": p, "batch_stats": stats}, xb, True, mutable=["batch_stats"])
                    return optax.softmax_cross_entropy_with_integer_labels(logits, tb).mean(), upd["batch_stats"]
                logits = net.apply({"params": p}, xb, True)
                return optax.softmax_cross_entropy_with_integer_labels(logits, tb).mean(), stats

            (_, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt_state = opt.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), new_stats, opt_state

        def acc(state):
            params, stats, _ = state
            variables = {"params": params, "batch_stats": stats} if use_bn else {"params": params}
            return jnp.mean(jnp.argmax(net.apply(variables, xd, False), -1) == td)

        key, scale = jax.random.key(0), jnp.float32(1.0)
        state = init(key, scale)
        return (jax.jit(init).lower(key, scale).compile(), jax.jit(step).lower(state, *batch).compile(),
                jax.jit(acc).lower(state).compile())

    result = _one_model_at_a_time(config, x, t, make)
    result["note"] = "Flax BatchNorm's running variance starts at 1 (the book's at 0)"
    return result


def scaling_point(num_models: int) -> dict:
    """One row of the scaling table, measured in this process: the book's sweep with ``num_models / 32`` seeds
    (``run_s`` excludes the compile, which the engine times apart)."""
    import resource

    import jax

    from bnjax import data, sweep

    if num_models % 32:
        raise ValueError(f"scaling points must be multiples of 32 (16 scales x 2 arms), got {num_models}")
    ds = data.load_bundled(1000, 0)
    config = sweep.SweepConfig(num_seeds=num_models // 32)
    timed = sweep.run_sweep(config, ds.x_train, ds.t_train, keep_final=False)
    updates = num_models * sweep.num_updates(config, 1000)
    flops = sweep.sweep_flops(config, 1000, 784)["total"]
    row = {
        "models": num_models,
        "compile_s": timed.timing["compile_s"],
        "run_s": timed.timing["run_s"],
        "model_updates_per_s": updates / timed.timing["run_s"],
        "gflops_per_s": flops / timed.timing["run_s"] / 1e9,
        "chunks": timed.grid.layout["num_chunks"],
        "models_per_chunk": timed.grid.layout["models_per_chunk"],
        "devices_used": timed.grid.layout["devices_used"],
        # ru_maxrss is in KiB on Linux.
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
    }
    stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        row["peak_device_gb"] = stats["peak_bytes_in_use"] / 1e9
    return row


def run_scaling(counts: list[int]) -> list[dict]:
    """Each scaling point in a fresh process, so its peak memory is its own."""
    rows = []
    root = Path(__file__).resolve().parents[1]
    for n in counts:
        print(f"scaling: {n} models ...", flush=True)
        proc = subprocess.run([sys.executable, "-m", "experiments.benchmark", "--scaling-one", str(n)], cwd=root,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"  failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}",
                  flush=True)
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    if rows:
        base = rows[0]["run_s"] / rows[0]["models"]
        for row in rows:
            row["per_model_cost_vs_first"] = round(row["run_s"] / row["models"] / base, 3)
    return rows


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from experiments.harness import set_xla_flags

    set_xla_flags()  # the same XLA defaults as the sweep CLI
    import jax

    # Every JAX variant multiplies in true float32, as bnjax's sweep does (no TF32 on GPUs).
    with jax.default_matmul_precision("highest"):
        if args.scaling_one:
            print(json.dumps(scaling_point(args.scaling_one)))
            return 0
        return _main(args)


def _main(args) -> int:
    skip = {s.strip().lower() for s in args.skip.split(",") if s.strip()}

    import jax

    from bnjax import data, sweep
    from experiments import harness

    harness.check_writable(args.out.parent)
    ds = data.load_bundled(1000, 0)
    config = sweep.SweepConfig()
    if args.quick:
        config = config._replace(weight_scales=(0.1, 0.01), num_records=2)
        args.repeats = 1
    num_train, input_size = ds.x_train.shape
    flops = sweep.sweep_flops(config, num_train, input_size)
    env = harness.environment()
    print(f"bnjax benchmark on {env['backend']} ({env['device_kind']}, {env['device_count']} device(s), "
          f"{env['cpu_count']} CPUs), jax {env['jax']}; {2 * len(config.weight_scales)} models, "
          f"{sweep.num_updates(config, num_train)} updates, {flops['total'] / 1e9:.0f} GFLOP of matmuls",
          flush=True)
    peak = measure_peak_gflops()
    print(f"float32 matmul peak: {peak['gflops']:.0f} GFLOP/s ({peak['n']}^3)", flush=True)

    plan = [
        ("a", "(a) bnjax sweep, one vmapped program", lambda: bench_sweep(config, ds.x_train, ds.t_train,
                                                                          args.repeats)),
        ("b", "(b) same jitted step, Python loop over models", lambda: bench_python_loop(config, ds.x_train,
                                                                                          ds.t_train)),
        ("c", "(c) NumPy float64 (book), all BLAS threads", lambda: bench_numpy(config, num_train, None)),
        ("c", "(c) NumPy float64 (book), 1 BLAS thread", lambda: bench_numpy(config, num_train, 1)),
        ("d", "(d) Flax linen + optax, one model at a time", lambda: bench_flax(config, ds.x_train, ds.t_train)),
    ]
    variants = []
    for letter, name, fn in plan:
        if letter in skip:
            continue
        print(f"running {name} ...", flush=True)
        res = fn()
        if res is None:
            print("  skipped (flax is not installed: pip install -e '.[bench]')", flush=True)
            continue
        res["name"] = name
        variants.append(res)
    base = next((v["run_s"] for v in variants if v["name"].startswith("(a)")), None)
    for v in variants:
        v["ratio_to_a"] = round(v["run_s"] / base, 2) if base else None
        v["gflops_per_s"] = flops["total"] / v["run_s"] / 1e9
        v["percent_of_peak"] = 100 * v["gflops_per_s"] / peak["gflops"]

    header = f"{'variant':<50} {'compile s':>9} {'run s':>8} {'run ratio to (a)':>16} {'GFLOP/s':>8} {'% peak':>7}"
    print("\n" + header + "\n" + "-" * len(header))
    for v in variants:
        print(f"{v['name']:<50} {v['compile_s']:>9.2f} {v['run_s']:>8.2f} {v['ratio_to_a']:>16.2f} "
              f"{v['gflops_per_s']:>8.1f} {v['percent_of_peak']:>6.0f}%")
    print(f"\nratio = run time / run time of (a); FLOPs = {flops['train'] / 1e9:.0f} G train + "
          f"{flops['eval'] / 1e9:.0f} G eval; peak = {peak['gflops']:.0f} GFLOP/s measured now.")

    if args.scaling is None:
        counts = [32] if args.quick else ([32, 256, 1024] if jax.default_backend() == "cpu"
                                               else [32, 256, 1024, 4096])
    elif args.scaling.strip().lower() == "none":
        counts = []
    else:
        counts = [int(c) for c in args.scaling.split(",") if c.strip()]
    scaling = run_scaling(counts) if counts else []
    if scaling:
        header = (f"{'models':>7} {'chunks':>6} {'run s':>8} {'model-updates/s':>16} {'GFLOP/s':>8} {'% peak':>7} "
                  f"{'cost/model vs 32':>16} {'peak RSS GB':>11}")
        print("\nscaling (the book's sweep with more seeds)\n" + header + "\n" + "-" * len(header))
        for row in scaling:
            row["percent_of_peak"] = 100 * row["gflops_per_s"] / peak["gflops"]
            print(f"{row['models']:>7} {row['chunks']:>6} {row['run_s']:>8.2f} {row['model_updates_per_s']:>16.0f} "
                  f"{row['gflops_per_s']:>8.1f} {row['percent_of_peak']:>6.0f}% "
                  f"{row['per_model_cost_vs_first']:>16.2f} {row['peak_rss_gb']:>11.2f}"
                  + (f"  (device peak {row['peak_device_gb']:.2f} GB)" if "peak_device_gb" in row else ""))
    harness.write_json(args.out, {"environment": env, "config": config._asdict(), "flops": flops, "peak": peak,
                                  "variants": variants, "scaling": scaling, "quick": args.quick})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
