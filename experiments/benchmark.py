"""Benchmark: the book's sweep as one compiled program against the obvious alternatives, side by side.

Variants, all on the same data and protocol (the bundled MNIST subset, 1000 training images, 191 updates and
20 records per model, 16 scales x BN/plain by default):

  (a) bnjax's sweep: every model in one jitted, vmapped program (bnjax.grid.run_grid)
  (b) the same jitted train step, looping over the models (and steps) in Python
  (c) the book's network in NumPy, float64, as the book runs it (all BLAS threads, and one BLAS thread)
  (d) Flax linen + optax, one model at a time, with one compile per structure (if flax is installed)

Reports compile and run time separately, each variant's run-time ratio to (a), and achieved GFLOP/s
(matmul FLOPs counted by bnjax.grid.grid_flops) against a float32 matmul peak measured in the same run.

Then a scaling table of the grid engine (experiments/benchmark_scaling.py): the book's sweep with more seeds
(32, 256, 1024 models; 4096 too on an accelerator), each in a fresh process, reporting model-updates per second,
GFLOP/s, the per-model cost relative to the 32-model run, the chunks used, and peak memory (host RSS; device
memory on an accelerator).

Then a layer section (experiments/benchmark_layers.py): one norm layer alone, the jitted forward + backward of
``sum(norm(x) * w)`` in training mode, float32, for bnjax ``batch_norm_apply``, ``batch_renorm()`` and
``ghost_batch_norm(32)`` against Flax linen ``nn.BatchNorm`` (fast and two-pass variance, if flax is installed),
as medians over interleaved rounds (20; 5 on ~1/16 of the elements with --quick) and ratios to bnjax
``batch_norm_apply``; then a float32 accuracy check of each batch variance at mean / std = 1e4 against float64
NumPy. ``--layers-only`` runs just this section; ``--skip l`` leaves it out. Speeds are reported (as ratios),
never asserted: they depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from experiments import benchmark_layers, benchmark_scaling


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="2 scales x 2 records, and small layer shapes with 5 rounds: checks that every variant runs")
    p.add_argument("--repeats", type=int, default=3, help="runs of (a) to take the median of (default: 3)")
    p.add_argument("--skip", default="", help="comma-separated variants to skip, e.g. 'c,d'; 'l' skips the layer "
                                              "section")
    p.add_argument("--layers-only", action="store_true",
                   help="run only the layer section (no training variants, no scaling table)")
    p.add_argument("--layer-shapes", type=benchmark_layers.parse_shapes, default=None, metavar="NxHxWxC,...",
                   help="shapes of the layer section, channels last (default: 128x32x32x64,256x14x14x256,1024x512; "
                        "32x16x16x64,64x7x7x256,128x512 with --quick)")
    p.add_argument("--layer-repeats", type=int, default=None, metavar="N",
                   help="interleaved rounds of the layer section to take medians of (default: 20; 5 with --quick)")
    p.add_argument("--scaling", default=None, metavar="N1,N2,...",
                   help="model counts of the scaling table, multiples of 32 (default: 32,256,1024 on CPU, "
                        "32,256,1024,4096 on an accelerator; 'none' to skip)")
    p.add_argument("--scaling-one", type=int, help=argparse.SUPPRESS)  # internal: one scaling point, JSON out
    p.add_argument("--out", type=Path, default=None,
                   help="JSON output path (default: runs/benchmark.json; runs/benchmark_layers.json with "
                        "--layers-only)")
    return p


def measure_peak_gflops(n: int | None = None, repeats: int = 5) -> dict:
    """Median float32 GFLOP/s of a large jitted square matmul on the default device.

    Args:
      n: the matrices' size (default 8192 on an accelerator, 2048 on CPU).
      repeats: timed calls after a warm-up.

    Returns:
      ``{"n": n, "gflops": ...}``.
    """
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


def _config_record(config) -> dict:
    """Every field of a ``GridConfig`` for the results file, each arm by its field names."""
    record = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    record["arms"] = {name: arm._asdict() for name, arm in config.arms.items()}
    return record


def bench_sweep(config, x, t, repeats: int) -> dict:
    """(a): the sweep as one compiled program, ``bnjax.grid.run_grid``.

    Args:
      config: the ``GridConfig`` (one seed, arms ``batchnorm`` and ``plain``).
      x, t: ``[N, 784]`` training images and ``[N]`` labels.
      repeats: runs to take the median run time of (the first one's compile time is reported).

    Returns:
      A variant's row: ``compile_s``, ``run_s``, ``final_batchnorm`` and ``final_plain`` (final training accuracy
      per scale).
    """
    from bnjax import grid

    runs = [grid.run_grid(config, x, t) for _ in range(repeats)]
    return {
        "compile_s": runs[0].timing["compile_s"],  # the first is the cold compile
        "run_s": statistics.median(r.timing["run_s"] for r in runs),
        "final_batchnorm": runs[0].metrics["train_accuracy"]["batchnorm"][0, :, -1].tolist(),
        "final_plain": runs[0].metrics["train_accuracy"]["plain"][0, :, -1].tolist(),
    }


def _one_model_at_a_time(config, x, t, make) -> dict:
    """Compile per network structure, then train the models one by one, step by step, from Python.

    ``make(use_bn, xd, td, example_batch)`` returns compiled ``init(key, scale) -> state``,
    ``step(state, xb, tb) -> state`` and ``accuracy(state) -> scalar`` (on ``xd``, ``td``). Every model gets
    the sweep's init keys and batches.
    """
    import jax.numpy as jnp

    from bnjax import grid

    num_train = x.shape[0]
    init_keys, batch_idx = book_keys_and_batches(config, num_train)
    steps_at = set(grid.record_steps(config, num_train).tolist())
    xd, td = jnp.asarray(x), jnp.asarray(t)
    batches = [(xd[i], td[i]) for i in batch_idx]  # gathered up front: the loop times the steps alone

    t0 = time.perf_counter()
    compiled = {use_bn: make(use_bn, xd, td, batches[0]) for use_bn in (True, False)}
    compile_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    finals = {True: [], False: []}
    for v, use_bn in enumerate((True, False)):
        init_c, step_c, acc_c = compiled[use_bn]
        for i, scale in enumerate(config.axes["weight_scale"]):
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
    engine draws them (``bnjax.grid.seed_keys``), so every variant trains the same models.

    Args:
      config: the ``GridConfig``.
      num_train: the number of training images.

    Returns:
      ``(init_keys [2, scales], batch_indices [updates, batch_size])``.
    """
    import jax
    import numpy as np

    from bnjax import grid

    data_key, init_keys, _ = grid.seed_keys(config.seed, 2, len(config.axes["weight_scale"]))
    shape = (grid.num_updates(config, num_train), config.batch_size)
    return init_keys, np.asarray(jax.random.randint(data_key, shape, 0, num_train))


def bench_python_loop(config, x, t) -> dict:
    """(b): bnjax's own train step, jitted once per network structure, called model by model, step by step.

    Args:
      config: the ``GridConfig``.
      x, t: ``[N, 784]`` training images and ``[N]`` labels.

    Returns:
      A variant's row, as ``bench_sweep``'s.
    """
    import jax
    import jax.numpy as jnp

    from bnjax import model, train

    opt = train.make_optimizer(config.optimizer, config.learning_rate)

    def make(use_bn, xd, td, batch):
        net = model.MLPConfig(xd.shape[1], tuple(config.hidden_sizes), config.num_classes, norm=use_bn)

        def init(key, scale):
            params, state = model.init(net, key, weight_init=None, weight_scale=scale)
            return train.train_state_init(params, state, opt)

        def step(ts, xb, tb):
            return train.train_step(net, ts, xb, tb, opt)[1]

        def acc(ts):
            return model.accuracy(net, ts.params, ts.state, xd, td)

        key, scale = jax.random.key(0), jnp.float32(1.0)
        ts = init(key, scale)
        return (jax.jit(init).lower(key, scale).compile(), jax.jit(step).lower(ts, *batch).compile(),
                jax.jit(acc).lower(ts).compile())

    return _one_model_at_a_time(config, x, t, make)


def bench_numpy(config, num_train: int, threads: int | None) -> dict:
    """(c): the NumPy network (experiments/numpy_book.py) in a subprocess, so the BLAS thread count can be
    pinned before NumPy loads.

    Args:
      config: the ``GridConfig`` (its scale count and records; the oracle draws its own weights and batches).
      num_train: the number of training images.
      threads: BLAS threads, or ``None`` for the library's default (all).

    Returns:
      A variant's row, as ``bench_sweep``'s (``compile_s`` 0).
    """
    env = dict(os.environ)
    if threads is not None:
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "experiments.numpy_book",
           "--num-scales", str(len(config.axes["weight_scale"])),
           "--epochs", str(config.num_records), "--train-size", str(num_train)]
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, check=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"compile_s": 0.0, "run_s": out["run_s"], "final_batchnorm": out["final_batchnorm"],
            "final_plain": out["final_plain"]}


def bench_flax(config, x, t) -> dict | None:
    """(d): idiomatic Flax linen + optax, one model at a time.

    The scale is applied to the initialised kernels (not baked into the module), so each structure compiles
    once; Flax's BatchNorm starts its running variance at 1 (the book's at 0).

    Args:
      config: the ``GridConfig``.
      x, t: ``[N, 784]`` training images and ``[N]`` labels.

    Returns:
      A variant's row, as ``bench_sweep``'s, with a ``note``; ``None`` if flax is not installed.
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


def main(argv=None) -> int:
    """``python -m experiments.benchmark``: run the variants, print the tables, write the JSON.

    Args:
      argv: the command line (``sys.argv[1:]`` if ``None``).

    Returns:
      The exit status, 0.
    """
    args = _parser().parse_args(argv)
    from experiments.runtime import set_xla_flags

    set_xla_flags()  # the same XLA defaults as the sweep CLI
    import jax

    # Every JAX variant multiplies in true float32, as bnjax's sweep does (no TF32 on GPUs).
    with jax.default_matmul_precision("highest"):
        if args.scaling_one:
            print(json.dumps(benchmark_scaling.scaling_point(args.scaling_one)))
            return 0
        return _main(args)


def _main(args) -> int:
    skip = {s.strip().lower() for s in args.skip.split(",") if s.strip()}

    import jax

    from bnjax import data, grid
    from experiments import cli, results

    if args.out is None:
        args.out = Path("runs") / ("benchmark_layers.json" if args.layers_only else "benchmark.json")
    cli.check_writable(args.out.parent)
    layer_shapes = args.layer_shapes or (benchmark_layers.QUICK_LAYER_SHAPES if args.quick
                                         else benchmark_layers.LAYER_SHAPES)
    layer_repeats = args.layer_repeats or (5 if args.quick else 20)
    if args.layers_only:
        env = results.environment()
        print(f"bnjax layer benchmark on {env['backend']} ({env['device_kind']}, {env['cpu_count']} CPUs), "
              f"jax {env['jax']}", flush=True)
        layer_res = benchmark_layers.bench_layers(layer_shapes, layer_repeats)
        benchmark_layers.print_layers(layer_res)
        results.write_json(args.out, {"environment": env, "layers": layer_res, "quick": args.quick})
        print(f"wrote {args.out}")
        return 0
    ds = data.load_bundled(1000, 0)
    config = grid.GridConfig()
    if args.quick:
        config = config.replace(axes={"weight_scale": (0.1, 0.01)}, num_records=2)
        args.repeats = 1
    num_train, input_size = ds.x_train.shape
    flops = grid.grid_flops(config, num_train, input_size)
    env = results.environment()
    print(f"bnjax benchmark on {env['backend']} ({env['device_kind']}, {env['device_count']} device(s), "
          f"{env['cpu_count']} CPUs), jax {env['jax']}; {2 * len(config.axes['weight_scale'])} models, "
          f"{grid.num_updates(config, num_train)} updates, {flops['total'] / 1e9:.0f} GFLOP of matmuls",
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

    layer_res = None
    if "l" not in skip:
        layer_res = benchmark_layers.bench_layers(layer_shapes, layer_repeats)
        benchmark_layers.print_layers(layer_res)

    if args.scaling is None:
        counts = [32] if args.quick else ([32, 256, 1024] if jax.default_backend() == "cpu"
                                               else [32, 256, 1024, 4096])
    elif args.scaling.strip().lower() == "none":
        counts = []
    else:
        counts = [int(c) for c in args.scaling.split(",") if c.strip()]
    scaling = benchmark_scaling.run_scaling(counts) if counts else []
    for row in scaling:
        row["percent_of_peak"] = 100 * row["gflops_per_s"] / peak["gflops"]
    if scaling:
        benchmark_scaling.print_scaling(scaling)
    results.write_json(args.out, {"environment": env, "config": _config_record(config), "flops": flops, "peak": peak,
                                  "variants": variants, "scaling": scaling, "layers": layer_res,
                                  "quick": args.quick})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
