"""Claim 1 of the book (ch. 6.3): batch norm lets training go faster because larger learning rates can be used.

The book's network and data (1000 images, batch 100, 191 SGD updates), with and without batch norm, at 13
learning rates ``logspace(-3, 1, 13)`` and two initialisations: the book's weight scale w = 0.158 (its panel
"W:0.158", where the plain net trains well at lr 0.01) and He init; 4 seeds by default, all in one run of the
grid engine. Then Bjorck et al.'s step-size probe (2018): at initialisation and after 10 updates, the loss
ratio L(theta - eta g) / L(theta) along the gradient g for 25 step sizes eta from 1e-4 to 10.

    python -m experiments.learning_rate                  # about 200 models, well under a minute on a laptop CPU
    python -m experiments.learning_rate --num-seeds 8 --lrs 0.01,0.1,1,3

What to expect (measured with bnjax at w = 0.29 and 0.16, 2 seeds, while designing this experiment): the plain
net overflows to NaN from lr 0.1-1.0 on, while BN still reaches 0.99-1.0 training accuracy at lr 3 and fails
only at 10.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from bnjax import claims
from experiments import cli, plot, protocol, runtime

ARMS = ("batchnorm", "plain")
THRESHOLD = 0.9
PROBE_UPDATES = 10

EPILOG = ("Within a seed, every model sees the same mini-batches, and the BN and plain nets of one "
          "initialisation start from the same Affine weights, so each comparison is paired. "
          "Verdict (results.json 'verdict'): max_stable_lr = the largest learning rate at which at least half "
          "the seeds stay finite and end at >= 0.9 training accuracy; updates_to_90 = the fewest updates (over "
          "learning rates) after which the mean accuracy first reaches 0.9. ")

NOTES = (
    "Training accuracy in evaluation mode (running statistics), as the book; a diverged model is scored "
    "as the book scores NaN scores (argmax -> class 0).",
    "BN and plain nets of one initialisation start from the same Affine weights and all models of a seed "
    "share the mini-batches: every comparison is paired.",
    "The probe's loss is the training-mode cross-entropy on all training images (batch statistics), its "
    "gradient taken there; ratios above 1 mean the step raised the loss, null means it overflowed.",
)


def add_options(p: argparse.ArgumentParser) -> None:
    """The learning rates, the two initialisations and the step-size probe.

    Args:
      p: the parser.
    """
    g = p.add_argument_group("protocol (defaults: the book's network and data)")
    cli.add_model_arg(g)
    lrs = g.add_mutually_exclusive_group()
    lrs.add_argument("--num-lrs", type=cli.int_in(1, 1000), default=13, metavar="N",
                     help="N learning rates logspace(-3, 1, N), 0.001 up to 10 (default: 13)")
    lrs.add_argument("--lrs", type=cli.float_list, metavar="LR1,LR2,...", help="explicit learning rates")
    g.add_argument("--init-scale", type=cli.positive_float, default=float(np.logspace(0, -4, 16)[3]),
                   metavar="W", help="the weight scale of the first initialisation; the second is He init "
                                     "(default: 0.1585, the book's panel W:0.158)")
    cli.add_epochs_arg(g, minimum=2)
    g.add_argument("--batch-size", type=cli.int_in(1, 100_000), default=100,
                   help="mini-batch size, drawn with replacement (default: 100)")
    pr = p.add_argument_group("step-size probe")
    pr.add_argument("--probe-steps", type=cli.int_in(2, 1000), default=25, metavar="N",
                    help="step sizes logspace(-4, 1, N) (default: 25)")
    pr.add_argument("--probe-lr", type=cli.positive_float, default=0.01,
                    help=f"learning rate of the {PROBE_UPDATES} SGD updates before the second probe (default: 0.01)")
    pr.add_argument("--no-probe", action="store_true", help="skip the probe")


def init_names(init_scale: float) -> dict[str, object]:
    """The two initialisations.

    Args:
      init_scale: the book's weight scale (``--init-scale``).

    Returns:
      Initialisation label -> ``Arm.weight_init`` value: the book's scale, then He.
    """
    return {f"w={init_scale:.4g}": float(init_scale), "he": "he"}


def arm_name(arm: str, init: str) -> str:
    """The engine's arm name of a net at an initialisation.

    Args:
      arm: ``'batchnorm'`` or ``'plain'``.
      init: an ``init_names`` label.

    Returns:
      ``'<arm> <init>'``.
    """
    return f"{arm} {init}"


def grid_config(args: argparse.Namespace, dataset=None):
    """The engine configuration the options describe: BN and plain at each initialisation (the two arms of an
    initialisation share their initial weights) over the learning rates.

    Args:
      args: the parsed options.
      dataset: unused.

    Returns:
      The ``grid.GridConfig``.
    """
    from bnjax import grid

    arms = {}
    for stream, (init, weight_init) in enumerate(init_names(args.init_scale).items()):
        for arm in ARMS:
            arms[arm_name(arm, init)] = grid.Arm(norm=arm == "batchnorm", weight_init=weight_init,
                                                  init_stream=stream)
    learning_rates = tuple(args.lrs or np.logspace(-3, 1, args.num_lrs).tolist())
    return grid.GridConfig(arms=arms, axes={"learning_rate": learning_rates}, weight_scale=1.0,
                            num_records=args.epochs, batch_size=args.batch_size, seed=args.seed,
                            num_seeds=args.num_seeds, max_models_per_chunk=args.max_models_per_chunk,
                            **cli.network_fields(args))


def verdict(learning_rates, record_steps, accuracy: dict, diverged: dict, inits, probe: dict | None = None,
            step_sizes=None) -> dict:
    """The numbers of the claim, from the recorded arrays.

    Args:
      learning_rates: ``[L]``.
      record_steps: ``[R]``.
      accuracy: arm name (``arm_name(arm, init)``) -> ``[seeds, L, R]`` training accuracy.
      diverged: arm name -> ``[seeds, L]``.
      inits: initialisation labels.
      probe: ``{'init'|'trained': arm name -> [seeds, E] loss ratios}`` or ``None``.
      step_sizes: ``[E]`` with ``probe``.

    Returns:
      ``max_stable_lr``, ``updates_to_90`` and ``updates_to_90_lr`` as ``[init][arm]`` (each with a
      ``'ratio'`` = BN's / plain's), ``plain_better_lrs[init]`` (learning rates where plain's mean final
      accuracy is above BN's by more than 0.01), and ``largest_loss_lowering_step[when][init][arm]`` with a
      probe.
    """
    lrs = np.asarray(learning_rates, float)
    out = {"threshold": THRESHOLD, "max_stable_lr": {}, "updates_to_90": {}, "updates_to_90_lr": {}}
    for init in inits:
        stable, updates, at = {}, {}, {}
        for arm in ARMS:
            name = arm_name(arm, init)
            acc = np.asarray(accuracy[name])
            stable[arm] = claims.max_stable_lr(lrs, acc[..., -1], diverged[name], THRESHOLD)
            n, i = claims.updates_to_threshold(record_steps, acc, THRESHOLD)
            updates[arm], at[arm] = n, (None if i is None else float(lrs[i]))
        stable["ratio"] = claims.ratio(stable["batchnorm"], stable["plain"])
        # Where the claim does not hold: learning rates at which plain ends clearly above BN (mean over seeds).
        final = {arm: np.asarray(accuracy[arm_name(arm, init)])[..., -1].mean(0) for arm in ARMS}
        out.setdefault("plain_better_lrs", {})[init] = lrs[final["plain"] > final["batchnorm"] + 0.01].tolist()
        updates["ratio"] = claims.ratio(updates["batchnorm"], updates["plain"])
        out["max_stable_lr"][init], out["updates_to_90"][init], out["updates_to_90_lr"][init] = stable, updates, at
    if probe is not None:
        out["largest_loss_lowering_step"] = {
            when: {init: {arm: claims.largest_step_below(step_sizes, ratios[arm_name(arm, init)]) for arm in ARMS}
                   for init in inits}
            for when, ratios in probe.items()
        }
    return out


def _fmt(value, spec=".3g") -> str:
    return "never" if value is None else format(value, spec)


def render(results: dict) -> str:
    """The verdict, from a results.json dict.

    Args:
      results: the results as read from results.json.

    Returns:
      Markdown: the protocol in a sentence, a table (per initialisation and arm: the largest stable learning
      rate, the updates to reach 0.9 and at which learning rate), then the comparisons, the learning rates
      where plain ends above BN and the probe's largest loss-lowering steps.
    """
    v = results["verdict"]
    rows = ["| init | arm | max stable lr | updates to 0.9 (at lr) |", "|---|---|---|---|"]
    for init, stable in v["max_stable_lr"].items():
        for arm in ARMS:
            rows.append(f"| {init} | {arm} | {_fmt(stable[arm])} | {_fmt(v['updates_to_90'][init][arm], 'd')} "
                        f"({_fmt(v['updates_to_90_lr'][init][arm])}) |")
    lines = []
    for init, stable in v["max_stable_lr"].items():
        r, u = stable["ratio"], v["updates_to_90"][init]["ratio"]
        lines.append(f"{init}: BN's largest stable learning rate is "
                     + (f"{r:.3g}x plain's" if r is not None else
                        f"{_fmt(stable['batchnorm'])} against plain's {_fmt(stable['plain'])}")
                     + "; BN needs " + (f"{u:.2g}x the updates plain needs to reach 0.9" if u is not None else
                                        f"{_fmt(v['updates_to_90'][init]['batchnorm'], 'd')} updates to reach 0.9, "
                                        f"plain {_fmt(v['updates_to_90'][init]['plain'], 'd')}"))
    for init, better in v.get("plain_better_lrs", {}).items():
        if better:
            lines.append(f"{init}: plain ends above BN (by > 0.01, mean over seeds) at lr "
                         + ", ".join(f"{lr:.3g}" for lr in better))
    for when, per_init in v.get("largest_loss_lowering_step", {}).items():
        label = "at initialisation" if when == "init" else f"after {PROBE_UPDATES} updates"
        parts = [f"{init}: BN {_fmt(s['batchnorm'])}, plain {_fmt(s['plain'])}" for init, s in per_init.items()]
        lines.append(f"probe {label}, largest step that lowers the loss (median over seeds): " + "; ".join(parts))
    lrs = results["axes"]["learning_rate"]
    text = [f"{len(results['seeds'])} seeds, learning rates {min(lrs):.3g} to {max(lrs):.3g}; a learning rate is "
            f"stable when at least half the seeds stay finite and end at >= {v['threshold']} training accuracy.",
            "", *rows, "", *[f"- {line}" for line in lines]]
    return "\n".join(text) + "\n"


def _arm_line(arm: str) -> dict:
    return {"label": plot.arm_label(arm), **plot.arm_style(arm)}


def accuracy_figure(learning_rates, accuracy: dict, inits, num_seeds: int, num_updates: int, network: str = ""):
    """Final training accuracy against the learning rate, one panel per initialisation.

    Args:
      learning_rates: ``[L]``.
      accuracy: arm name -> ``[seeds, L, R]``.
      inits: initialisation labels.
      num_seeds: seeds, for the title.
      num_updates: updates per model, for the title.
      network: what the title says of the network first (``cli.network_title``).

    Returns:
      The matplotlib figure.
    """
    plt = plot.pyplot()
    fig, axes = plt.subplots(1, len(inits), figsize=(4.2 * len(inits), 3.4), squeeze=False)
    for ax, init in zip(axes[0], inits):
        for arm in ARMS:
            plot.band(ax, learning_rates, np.asarray(accuracy[arm_name(arm, init)])[..., -1], **_arm_line(arm))
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("learning rate")
        ax.set_title(f"init {init}", fontsize=10)
        ax.axhline(THRESHOLD, color="grey", lw=0.5, ls=":")
    axes[0, 0].set_ylabel("final training accuracy")
    axes[0, -1].legend(loc="lower left", fontsize=8)
    fig.suptitle(f"{network}after {num_updates} updates; mean and min..max over {num_seeds} seed(s)", fontsize=10)
    fig.tight_layout()
    return fig


def curves_figure(learning_rates, accuracy: dict, inits, record_steps, num_seeds: int, picks=(0.01, 0.1, 1.0, 10.0),
                  network: str = ""):
    """Training curves at the learning rates nearest ``picks``, a row per initialisation.

    Args:
      learning_rates: ``[L]``.
      accuracy: arm name -> ``[seeds, L, R]``.
      inits: initialisation labels.
      record_steps: ``[R]``.
      num_seeds: seeds, for the title.
      picks: the learning rates to show (the nearest of ``learning_rates``).
      network: what the title says of the network first (``cli.network_title``).

    Returns:
      The matplotlib figure.
    """
    plt = plot.pyplot()
    lrs = np.asarray(learning_rates)
    idx = sorted({int(np.argmin(np.abs(np.log(lrs) - np.log(p)))) for p in picks})
    fig, axes = plt.subplots(len(inits), len(idx), figsize=(3.0 * len(idx), 2.5 * len(inits)), squeeze=False)
    for r, init in enumerate(inits):
        for c, i in enumerate(idx):
            ax = axes[r, c]
            for arm in ARMS:
                plot.band(ax, np.asarray(record_steps), np.asarray(accuracy[arm_name(arm, init)])[:, i],
                          **_arm_line(arm))
            ax.set_ylim(0, 1.02)
            ax.set_title(f"{init}, lr {lrs[i]:.3g}", fontsize=9)
            if c == 0:
                ax.set_ylabel("training accuracy")
            if r == len(inits) - 1:
                ax.set_xlabel("updates")
    axes[0, -1].legend(loc="lower right", fontsize=7)
    fig.suptitle(f"{network}training curves, mean and min..max over {num_seeds} seed(s)", fontsize=10)
    fig.tight_layout()
    return fig


CEILING = 1e3  # ratios above (or overflowing) are drawn at the ceiling


def probe_figure(step_sizes, probe: dict, inits):
    """The probe's loss ratios against the step size, a row per moment, a column per initialisation.

    Args:
      step_sizes: ``[E]``.
      probe: ``{'init'|'trained'} -> arm name -> [seeds, E]`` loss ratios.
      inits: initialisation labels.

    Returns:
      The matplotlib figure.
    """
    plt = plot.pyplot()
    whens = list(probe)
    fig, axes = plt.subplots(len(whens), len(inits), figsize=(4.2 * len(inits), 3.0 * len(whens)), squeeze=False)
    for r, when in enumerate(whens):
        for c, init in enumerate(inits):
            ax = axes[r, c]
            for arm in ARMS:
                ratios = np.asarray(probe[when][arm_name(arm, init)], float)
                ratios = np.where(np.isfinite(ratios), np.minimum(ratios, CEILING), CEILING)
                plot.band(ax, step_sizes, ratios, center="median", **_arm_line(arm))
            ax.axhline(1.0, color="grey", lw=0.6, ls=":")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_ylim(0.3, CEILING * 1.5)
            label = "at initialisation" if when == "init" else f"after {PROBE_UPDATES} updates"
            ax.set_title(f"{init}, {label}", fontsize=9)
            if c == 0:
                ax.set_ylabel("L(theta - eta g) / L(theta)")
            if r == len(whens) - 1:
                ax.set_xlabel("step size eta")
    axes[0, -1].legend(loc="upper left", fontsize=7)
    fig.suptitle(f"step-size probe: median and min..max over seeds (overflow drawn at {CEILING:g})", fontsize=10)
    fig.tight_layout()
    return fig


def run_probe(config, ds, step_sizes, probe_lr: float) -> dict:
    """Bjorck et al.'s step-size probe on the grid's models.

    Args:
      config: the grid's ``GridConfig``.
      ds: the dataset (the probe's loss is on all its training images).
      step_sizes: ``[E]``.
      probe_lr: the learning rate of the updates before the second probe.

    Returns:
      Loss ratios ``{'init', 'trained'} -> arm name -> [seeds, E]``: at the grid's own initial weights and after
      ``PROBE_UPDATES`` SGD updates at ``probe_lr`` (one more small run of the engine, final states kept).
    """
    import jax
    import jax.numpy as jnp

    from bnjax import grid, train

    single = config.replace(axes={}, learning_rate=probe_lr, keep_final=True)
    x = jnp.asarray(ds.x_train)
    t = jnp.asarray(ds.t_train, jnp.int32)
    eta = jnp.asarray(step_sizes, jnp.float32)
    states = {"init": grid.init_models(single, ds.x_train.shape[1])}
    after = grid.run_grid(single.replace(num_records=2, updates_per_record=PROBE_UPDATES - 1), ds.x_train,
                           ds.t_train)
    states["trained"] = after.final
    out = {}
    with jax.default_matmul_precision(config.matmul_precision):
        for when, models in states.items():
            out[when] = {}
            for name, arm in config.arms.items():
                net = config.network(arm, ds.x_train.shape[1])
                fn = jax.jit(jax.vmap(lambda ts, net=net: train.step_size_probe(net, ts.params, ts.state, x, t, eta)))
                out[when][name] = np.asarray(fn(jax.tree_util.tree_map(jnp.asarray, models[name])))
    return out


def measure(run: protocol.Run) -> None:
    """The step-size probe (unless ``--no-probe``), on every process: ``run.data['step_sizes']`` and
    ``run.data['probe']`` (``None`` when skipped).

    Args:
      run: the run (its engine configuration and data).
    """
    args = run.args
    run.data["step_sizes"] = np.logspace(-4, 1, args.probe_steps)
    run.data["probe"] = None
    if not args.no_probe:
        t0 = time.perf_counter()
        runtime.say(args, "step-size probe...")
        run.data["probe"] = run_probe(run.config, run.dataset, run.data["step_sizes"], args.probe_lr)
        run.timing["probe_s"] = time.perf_counter() - t0


def analyse(run: protocol.Run) -> dict:
    """The verdict, and the probe's ratios when it ran.

    Args:
      run: the run.

    Returns:
      ``inits``, ``verdict`` and (with the probe) ``probe``.
    """
    inits = init_names(run.args.init_scale)
    probe, step_sizes = run.data["probe"], run.data["step_sizes"]
    v = verdict(run.config.axes["learning_rate"], run.result.record_steps, run.result.metrics["train_accuracy"],
                run.result.diverged, list(inits), probe, step_sizes)
    fields = {"inits": dict(inits), "verdict": v}
    if probe is not None:
        fields["probe"] = {"step_sizes": step_sizes, "updates_before_trained": PROBE_UPDATES,
                           "learning_rate": run.args.probe_lr, "loss_ratio": probe}
    return fields


def _accuracy_figure(run: protocol.Run):
    return accuracy_figure(run.config.axes["learning_rate"], run.result.metrics["train_accuracy"],
                           list(init_names(run.args.init_scale)), run.args.num_seeds,
                           int(run.result.record_steps[-1]), network=cli.network_title(run.args))


def _curves_figure(run: protocol.Run):
    return curves_figure(run.config.axes["learning_rate"], run.result.metrics["train_accuracy"],
                         list(init_names(run.args.init_scale)), run.result.record_steps, run.args.num_seeds,
                         network=cli.network_title(run.args))


def _probe_figure(run: protocol.Run):
    return probe_figure(run.data["step_sizes"], run.data["probe"], list(init_names(run.args.init_scale)))


EXPERIMENT = protocol.Experiment(
    name="learning_rate",
    title="Claim 1: larger learning rates",
    question="Claim 1: does BN allow larger learning rates?",
    doc=__doc__,
    epilog=EPILOG,
    options=add_options,
    num_seeds=4,
    grid=grid_config,
    describe=lambda args, config: (f"{len(config.axes['learning_rate'])} learning rates x BN/plain x "
                                   f"{len(init_names(args.init_scale))} inits x {args.num_seeds} seed(s)"),
    measure=measure,
    analyse=analyse,
    render=render,
    notes=NOTES,
    figures=(protocol.Figure("learning_rate.png", _accuracy_figure),
             protocol.Figure("learning_rate_curves.png", _curves_figure),
             protocol.Figure("step_size_probe.png", _probe_figure, when=lambda run: run.data["probe"] is not None)),
    quick=("--lrs", "0.01,3", "--epochs", "3", "--num-seeds", "2", "--train-size", "200", "--probe-steps", "4"),
)


main = protocol.command(EXPERIMENT)


if __name__ == "__main__":
    sys.exit(runtime.main_wrapper(main))
