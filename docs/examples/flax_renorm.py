"""Batch Renorm against Flax's own batch norm at batch size 4, in a small Flax (linen) conv net on MNIST.

Both nets are the same except for their norm layer: the same initial weights (the same key), the same
batches in the same order, the same optimizer. Batch norm normalises training batches with their own statistics,
noisy at 4 images, and evaluates with running averages it never trained with; Batch Renorm (Ioffe 2017) corrects
each training batch towards the running statistics, so training and evaluation agree.

Run it from the repository root (it needs flax: pip install -e ".[flax]"):

    python docs/examples/flax_renorm.py            # a few hundred steps, well under a minute on a laptop
    python docs/examples/flax_renorm.py --steps 20
"""

import argparse

import flax.linen as nn
import jax
import numpy as np
import optax
from flax.training import train_state

from bnjax.data import load_bundled
from bnjax.flax import linen as bnn


class ConvNet(nn.Module):
    norm: type  # the norm layer's class: nn.BatchNorm or bnn.BatchRenorm
    momentum: float = 0.9  # bnjax's default; Flax's 0.99 lags the weights on a run this short

    @nn.compact
    def __call__(self, x, train: bool):
        for features in (16, 32):
            x = nn.Conv(features, (3, 3), strides=2, use_bias=False)(x)
            x = self.norm(use_running_average=not train, momentum=self.momentum)(x)
            x = nn.relu(x)
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def train_and_evaluate(norm, momentum, data, steps, batch_size=4):
    model = ConvNet(norm, momentum)
    images = data.x_train.reshape(-1, 28, 28, 1)
    variables = model.init(jax.random.key(0), images[:batch_size], train=False)
    state = train_state.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=optax.adam(1e-3))
    batch_stats = variables["batch_stats"]

    @jax.jit
    def step(state, batch_stats, x, labels):
        def loss_fn(params):
            logits, updates = state.apply_fn({"params": params, "batch_stats": batch_stats}, x, train=True,
                                             mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

        grads, updates = jax.grad(loss_fn, has_aux=True)(state.params)
        return state.apply_gradients(grads=grads), updates["batch_stats"]

    order = np.random.default_rng(0).permutation(len(images))  # the same data order for both nets
    for i in range(steps):
        idx = order[(i * batch_size) % len(order):][:batch_size]
        state, batch_stats = step(state, batch_stats, images[idx], data.t_train[idx])

    logits = model.apply({"params": state.params, "batch_stats": batch_stats},
                         data.x_heldout.reshape(-1, 28, 28, 1), train=False)
    return float((logits.argmax(-1) == data.t_heldout).mean())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps (batches of 4 images)")
    args = parser.parse_args()
    data = load_bundled(num_train=4000, num_heldout=1000)
    for name, norm, momentum in (("flax.linen.BatchNorm", nn.BatchNorm, 0.9),
                                 ("flax.linen.BatchNorm at Flax's default momentum 0.99", nn.BatchNorm, 0.99),
                                 ("bnjax.flax.linen.BatchRenorm", bnn.BatchRenorm, 0.9)):
        print(f"{name}: {train_and_evaluate(norm, momentum, data, args.steps):.3f}")
