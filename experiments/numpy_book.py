"""The book's network in NumPy, written from the formulas with hand-written backward passes.

It is the tests' independent oracle and the benchmark's NumPy variant (``python -m experiments.numpy_book``,
run by ``experiments/benchmark.py`` in a subprocess); nothing here imports bnjax or JAX. Float64 by default, as
the book. Conventions are the book's ch. 6.3 protocol (docs/experiments.md, "The sweep: the book's figure"):
eps 1e-6, running = momentum * running + (1 - momentum) * batch with the biased variance, ReLU gradient 0 at 0,
softmax cross-entropy gradient (softmax - onehot) / N.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


class BatchNorm:
    """The book's ``BatchNorm`` layer for ``[N, D]`` inputs, running statistics starting at 0 unless given.

    Args:
      gamma, beta: ``[D]`` scale and offset.
      momentum: weight of the old running value in ``momentum * old + (1 - momentum) * batch``.
      eps: added to the variance.
      running_mean, running_var: ``[D]`` initial running statistics (zeros if ``None``).
    """

    def __init__(self, gamma, beta, momentum=0.9, eps=1e-6, running_mean=None, running_var=None):
        self.gamma, self.beta = np.array(gamma, np.float64), np.array(beta, np.float64)
        self.momentum, self.eps = momentum, eps
        d = self.gamma.shape[0]
        self.running_mean = np.zeros(d) if running_mean is None else np.array(running_mean, np.float64)
        self.running_var = np.zeros(d) if running_var is None else np.array(running_var, np.float64)

    def forward(self, x, train_flg=True):
        """Normalise ``x`` (batch statistics and a running update if ``train_flg``, else running statistics).

        Args:
          x: ``[N, D]`` input.
          train_flg: training mode (the book's flag).

        Returns:
          ``[N, D]``: ``gamma * x_normalised + beta``.
        """
        if train_flg:
            mu = x.mean(axis=0)
            xc = x - mu
            var = np.mean(xc**2, axis=0)
            std = np.sqrt(var + self.eps)
            xn = xc / std
            self.batch_size, self.xc, self.xn, self.std = x.shape[0], xc, xn, std
            self.running_mean = self.momentum * self.running_mean + (1 - self.momentum) * mu
            self.running_var = self.momentum * self.running_var + (1 - self.momentum) * var
        else:
            xn = (x - self.running_mean) / np.sqrt(self.running_var + self.eps)
        return self.gamma * xn + self.beta

    def backward(self, dout):
        """The backward pass of the last training ``forward``; stores ``dgamma`` and ``dbeta``.

        Args:
          dout: ``[N, D]`` gradient of the loss w.r.t. the output.

        Returns:
          ``[N, D]`` gradient w.r.t. the input.
        """
        self.dbeta = dout.sum(axis=0)
        self.dgamma = np.sum(self.xn * dout, axis=0)
        dxn = self.gamma * dout
        dxc = dxn / self.std
        dstd = -np.sum((dxn * self.xc) / (self.std * self.std), axis=0)
        dvar = 0.5 * dstd / self.std
        dxc += (2.0 / self.batch_size) * self.xc * dvar
        dmu = np.sum(dxc, axis=0)
        return dxc - dmu / self.batch_size


class Affine:
    """``x @ W + b``.

    Args:
      W: ``[D_in, D_out]`` weights.
      b: ``[D_out]`` bias.
    """

    def __init__(self, W, b):
        self.W, self.b = np.array(W, np.float64), np.array(b, np.float64)

    def forward(self, x):
        """Args: x: ``[N, D_in]``. Returns: ``[N, D_out]``."""
        self.x = x
        return x @ self.W + self.b

    def backward(self, dout):
        """Stores ``dW`` and ``db``.

        Args:
          dout: ``[N, D_out]`` gradient w.r.t. the output.

        Returns:
          ``[N, D_in]`` gradient w.r.t. the input.
        """
        self.dW = self.x.T @ dout
        self.db = dout.sum(axis=0)
        return dout @ self.W.T


class Relu:
    """``max(x, 0)``, gradient 0 where ``x <= 0`` (as the book's)."""

    def forward(self, x):
        """Args: x: any shape. Returns: ``x`` with its non-positive entries set to 0."""
        self.mask = x <= 0
        out = x.copy()
        out[self.mask] = 0
        return out

    def backward(self, dout):
        """Args: dout: gradient w.r.t. the output. Returns: the gradient w.r.t. the input."""
        dout = dout.copy()
        dout[self.mask] = 0
        return dout


def softmax(x):
    """Row-wise softmax, shifted by the row maximum.

    Args:
      x: ``[N, K]`` logits.

    Returns:
      ``[N, K]`` probabilities.
    """
    x = x - x.max(axis=1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=1, keepdims=True)


class SoftmaxWithLoss:
    """Softmax then mean cross-entropy against integer labels."""

    def forward(self, x, t):
        """Args: x: ``[N, K]`` logits; t: ``[N]`` integer labels. Returns: the mean cross-entropy, a float."""
        self.y, self.t = softmax(x), t
        n = x.shape[0]
        return -np.mean(np.log(self.y[np.arange(n), t]))

    def backward(self):
        """Returns: ``[N, K]`` gradient of the loss w.r.t. the logits, ``(softmax - onehot) / N``."""
        n = self.t.shape[0]
        dx = self.y.copy()
        dx[np.arange(n), self.t] -= 1
        return dx / n


class Net:
    """MultiLayerNetExtend (ReLU, optional BN, no dropout, no weight decay unless given).

    Args:
      Ws: the weight matrices, ``[D_in, D_out]`` each; biases start at 0.
      use_bn: a ``BatchNorm`` (gamma 1, beta 0) after every hidden Affine.
      momentum, eps: the batch norms' settings.
      weight_decay_lambda: the L2 coefficient (the loss adds ``lambda / 2 * sum(W ** 2)``).
    """

    def __init__(self, Ws, use_bn, momentum=0.9, eps=1e-6, weight_decay_lambda=0.0):
        self.affines = [Affine(W, np.zeros(W.shape[1])) for W in Ws]
        n_hidden = len(Ws) - 1
        self.bns = (
            [BatchNorm(np.ones(W.shape[1]), np.zeros(W.shape[1]), momentum, eps) for W in Ws[:-1]]
            if use_bn
            else []
        )
        self.relus = [Relu() for _ in range(n_hidden)]
        self.last = SoftmaxWithLoss()
        self.lam = weight_decay_lambda

    def predict(self, x, train_flg):
        """Args: x: ``[N, D_in]``; train_flg: training mode. Returns: ``[N, K]`` logits."""
        h = x
        for i, aff in enumerate(self.affines[:-1]):
            h = aff.forward(h)
            if self.bns:
                h = self.bns[i].forward(h, train_flg)
            h = self.relus[i].forward(h)
        return self.affines[-1].forward(h)

    def loss(self, x, t, train_flg=True):
        """Args: x: ``[N, D_in]``; t: ``[N]`` labels; train_flg: training mode. Returns: the loss with decay."""
        decay = 0.5 * self.lam * sum(np.sum(a.W**2) for a in self.affines)
        return self.last.forward(self.predict(x, train_flg), t) + decay

    def gradient(self, x, t):
        """One training forward (updating running statistics once) and backward; returns the loss.

        Args:
          x: ``[N, D_in]`` inputs.
          t: ``[N]`` integer labels.

        Returns:
          The loss; every layer's gradients are stored on it (``dW``, ``db``, ``dgamma``, ``dbeta``).
        """
        value = self.loss(x, t, True)
        d = self.last.backward()
        d = self.affines[-1].backward(d)
        for i in reversed(range(len(self.affines) - 1)):
            d = self.relus[i].backward(d)
            if self.bns:
                d = self.bns[i].backward(d)
            d = self.affines[i].backward(d)
        return value

    def sgd_step(self, x, t, lr):
        """One SGD update in place (weight decay on the weights only).

        Args:
          x: ``[N, D_in]`` inputs.
          t: ``[N]`` integer labels.
          lr: the learning rate.
        """
        self.gradient(x, t)
        for a in self.affines:
            a.W -= lr * (a.dW + self.lam * a.W)
            a.b -= lr * a.db
        for bn in self.bns:
            bn.gamma -= lr * bn.dgamma
            bn.beta -= lr * bn.dbeta

    def accuracy(self, x, t):
        """Args: x: ``[N, D_in]``; t: ``[N]`` labels. Returns: the fraction right in evaluation mode."""
        with np.errstate(all="ignore"):
            return float(np.mean(np.argmax(self.predict(x, False), axis=1) == t))


def run_sweep(x, t, weight_scales, *, num_records=20, batch_size=100, lr=0.01, seed=0,
              hidden_sizes=(100, 100, 100, 100, 100), num_classes=10):
    """The book's ``batch_norm_test.py`` loop for every scale: BN and plain nets, own initial weights, same
    batches (drawn with replacement), a record after 1 update and then every ``train_size // batch_size``.

    Args:
      x: ``[N, D]`` training images.
      t: ``[N]`` integer labels.
      weight_scales: ``[S]`` standard deviations of the initial weights.
      num_records, batch_size, lr, seed, hidden_sizes, num_classes: the protocol.

    Returns:
      ``{'batchnorm': [S, R], 'plain': [S, R]}`` training accuracies (evaluation mode).
    """
    rng = np.random.RandomState(seed)
    x = np.asarray(x, np.float64)
    n = x.shape[0]
    sizes = [x.shape[1], *hidden_sizes, num_classes]
    iters = max(n // batch_size, 1)
    out = {"batchnorm": np.zeros((len(weight_scales), num_records)), "plain": np.zeros((len(weight_scales), num_records))}
    for i, w in enumerate(weight_scales):
        nets = {
            name: Net([w * rng.randn(a, b) for a, b in zip(sizes[:-1], sizes[1:])], use_bn)
            for name, use_bn in (("batchnorm", True), ("plain", False))
        }
        record, step = 0, 0
        with np.errstate(all="ignore"):  # the plain net at large scales overflows, as in the book
            while record < num_records:
                idx = rng.choice(n, batch_size)
                for net in nets.values():
                    net.sgd_step(x[idx], t[idx], lr)
                if step % iters == 0:
                    for name, net in nets.items():
                        out[name][i, record] = net.accuracy(x, t)
                    record += 1
                step += 1
    return out


def main(argv=None) -> int:
    """``python -m experiments.numpy_book``: time the book's protocol on the bundled subset.

    The benchmark runs it in a subprocess, so BLAS threads can be pinned with ``OPENBLAS_NUM_THREADS=1`` before
    NumPy loads. Prints one JSON line: ``run_s`` and the final accuracies ``final_batchnorm``, ``final_plain``.

    Args:
      argv: the command line (``sys.argv[1:]`` if ``None``).

    Returns:
      The exit status, 0.
    """
    parser = argparse.ArgumentParser(prog="python -m experiments.numpy_book", description=__doc__.splitlines()[0])
    parser.add_argument("--num-scales", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--train-size", type=int, default=1000)
    args = parser.parse_args(argv)
    with np.load(os.path.join(os.path.dirname(__file__), "..", "bnjax", "assets", "mnist_5k.npz")) as z:
        images, labels = z["images"], z["labels"]
    perm = np.random.RandomState(0).permutation(len(labels))[: args.train_size]
    xs = images[perm].reshape(len(perm), -1) / 255.0
    ts = labels[perm].astype(np.int64)
    t0 = time.perf_counter()
    acc = run_sweep(xs, ts, np.logspace(0, -4, args.num_scales), num_records=args.epochs)
    run_s = time.perf_counter() - t0
    print(json.dumps({"run_s": run_s, "final_batchnorm": acc["batchnorm"][:, -1].tolist(),
                      "final_plain": acc["plain"][:, -1].tolist()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
