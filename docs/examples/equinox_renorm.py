"""Batch Renorm against Equinox's own BatchNorm: a small conv net on the bundled MNIST, batch size 4.

Run from the repository root: ``python docs/examples/equinox_renorm.py`` (``--steps N`` to change the length).
Both nets start from the same weights and see the same images in the same order; only the norm differs.
Prints each one's held-out accuracy (running statistics, ``inference=True``) as ``name: 0.xxx``.
"""

import argparse

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import bnjax.equinox
from bnjax import data


class Net(eqx.Module):
    conv: eqx.nn.Conv2d
    norm: eqx.Module  # the norm under test; a stateful layer: (x, state) -> (y, state)
    linear: eqx.nn.Linear

    def __init__(self, norm, key):
        key_conv, key_linear = jax.random.split(key)
        self.conv = eqx.nn.Conv2d(1, 8, kernel_size=3, stride=2, key=key_conv)  # [1, 28, 28] -> [8, 13, 13]
        self.norm = norm
        self.linear = eqx.nn.Linear(8 * 13 * 13, 10, key=key_linear)

    def __call__(self, x, state):  # one image: Equinox layers take one example, vmap makes the batch
        h, state = self.norm(self.conv(x.reshape(1, 28, 28)), state)
        return self.linear(jax.nn.relu(h).ravel()), state


def batched(model, state, x):  # the norm's statistics are taken across the named axis "batch"
    return jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="training steps of batch size 4 (default 400)")
    args = parser.parse_args()

    mnist = data.load("bundled", num_train=2000, num_heldout=1000)
    order = np.random.RandomState(0).randint(0, len(mnist.t_train), size=(args.steps, 4))  # the same for both
    optimizer = optax.adam(1e-3)

    @eqx.filter_jit
    def train_step(model, state, opt_state, x, labels):
        def loss_fn(model, state):
            logits, state = batched(model, state, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), state

        (_, state), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model, state)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), state, opt_state

    @eqx.filter_jit
    def accuracy(model, state, x, labels):
        logits, _ = batched(eqx.nn.inference_mode(model), state, x)
        return jnp.mean(jnp.argmax(logits, axis=-1) == labels)

    norms = {
        "bnjax.equinox.BatchRenorm": bnjax.equinox.BatchRenorm(8, "batch"),  # momentum 0.9, r_max 3, d_max 5
        "eqx.nn.BatchNorm": eqx.nn.BatchNorm(8, "batch", mode="ema"),  # Equinox's default mode, named to silence
    }                                                                    # its warning; momentum 0.99
    for name, norm in norms.items():
        model, state = eqx.nn.make_with_state(Net)(norm, jax.random.key(0))
        opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
        for rows in order:
            model, state, opt_state = train_step(model, state, opt_state, mnist.x_train[rows], mnist.t_train[rows])
        print(f"{name}: {float(accuracy(model, state, mnist.x_heldout, mnist.t_heldout)):.3f}")


if __name__ == "__main__":
    main()
