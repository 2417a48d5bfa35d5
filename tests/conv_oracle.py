"""The book's ch. 7 ``SimpleConvNet`` in float64 NumPy, written from the formulas with hand-written backward
passes: an im2col convolution (its backward through col2im), max pooling that routes each window's gradient to
its argmax, and the Affine / ReLU / BatchNorm / SoftmaxWithLoss layers of ``experiments/numpy_book.py``. NHWC
images and HWIO kernels (the book's ``Convolution`` is NCHW; the formulas are the same). Imports neither JAX nor
bnjax; nothing here calls the code under test."""

import numpy as np

from experiments.numpy_book import Affine, BatchNorm, Relu, SoftmaxWithLoss


def im2col(x, fh, fw, stride, pad):
    """``[N, H, W, C]`` -> ``[N * Ho * Wo, fh * fw * C]``: one row per output position, its window's values in
    ``(i, j, c)`` order (the order of an HWIO kernel reshaped to ``[fh * fw * C, F]``)."""
    n, h, w, c = x.shape
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ho, wo = (h + 2 * pad - fh) // stride + 1, (w + 2 * pad - fw) // stride + 1
    cols = np.empty((n, ho, wo, fh, fw, c))
    for i in range(fh):
        for j in range(fw):
            cols[:, :, :, i, j, :] = xp[:, i : i + stride * ho : stride, j : j + stride * wo : stride, :]
    return cols.reshape(n * ho * wo, fh * fw * c), (ho, wo)


def col2im(cols, x_shape, fh, fw, stride, pad):
    """The adjoint of ``im2col``: each row's window values added back to the positions they came from (padding
    dropped)."""
    n, h, w, c = x_shape
    ho, wo = (h + 2 * pad - fh) // stride + 1, (w + 2 * pad - fw) // stride + 1
    cols = cols.reshape(n, ho, wo, fh, fw, c)
    xp = np.zeros((n, h + 2 * pad, w + 2 * pad, c))
    for i in range(fh):
        for j in range(fw):
            xp[:, i : i + stride * ho : stride, j : j + stride * wo : stride, :] += cols[:, :, :, i, j, :]
    return xp[:, pad : pad + h, pad : pad + w, :]


class Convolution:
    """``W [fh, fw, C, F]``, ``b [F]``: ``im2col(x) @ W.reshape(-1, F) + b``."""

    def __init__(self, W, b, stride=1, pad=0):
        self.W, self.b = np.array(W, np.float64), np.array(b, np.float64)
        self.stride, self.pad = stride, pad

    def forward(self, x):
        fh, fw, _, f = self.W.shape
        self.x_shape = x.shape
        self.cols, (ho, wo) = im2col(x, fh, fw, self.stride, self.pad)
        out = self.cols @ self.W.reshape(-1, f) + self.b
        return out.reshape(x.shape[0], ho, wo, f)

    def backward(self, dout):
        fh, fw, _, f = self.W.shape
        d = dout.reshape(-1, f)
        self.dW = (self.cols.T @ d).reshape(self.W.shape)
        self.db = d.sum(axis=0)
        return col2im(d @ self.W.reshape(-1, f).T, self.x_shape, fh, fw, self.stride, self.pad)


class Pooling:
    """Max pooling ``p x p``, stride ``p``; the backward sends each window's gradient to its (first) argmax."""

    def __init__(self, p):
        self.p = p

    def forward(self, x):
        n, h, w, c = x.shape
        p = self.p
        win = x.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 5, 2, 4).reshape(n, h // p, w // p, c, p * p)
        self.x_shape, self.arg = x.shape, win.argmax(axis=-1)
        return win.max(axis=-1)

    def backward(self, dout):
        n, h, w, c = self.x_shape
        p = self.p
        win = np.zeros((n, h // p, w // p, c, p * p))
        np.put_along_axis(win, self.arg[..., None], dout[..., None], axis=-1)
        return win.reshape(n, h // p, w // p, c, p, p).transpose(0, 1, 4, 2, 5, 3).reshape(n, h, w, c)


class ChannelBatchNorm(BatchNorm):
    """The book's ``BatchNorm`` per channel of ``[N, H, W, C]``: the ``[N * H * W, C]`` view."""

    def forward(self, x, train_flg=True):
        self.shape = x.shape
        return super().forward(x.reshape(-1, x.shape[-1]), train_flg).reshape(x.shape)

    def backward(self, dout):
        return super().backward(dout.reshape(-1, dout.shape[-1])).reshape(self.shape)


class ConvNet:
    """Conv -> [BN] -> ReLU -> pool -> flatten (NHWC order) -> (Affine -> [BN] -> ReLU) per hidden -> Affine.

    Args:
      conv_W, conv_b: the kernel ``[fh, fw, C, F]`` and bias.
      affine: ``[(W, b), ...]``, hidden layers first.
      use_bn: book batch norms (gamma 1, beta 0, running statistics from 0) after the conv and each hidden Affine.
      stride, pad, pool: the geometry.
      norm_forward: optional ``f(layer_index, h, train_flg) -> h`` replacing the batch norms in the forward pass
        (another norm's oracle; no backward then).
      weight_decay_lambda: the loss adds ``lambda / 2 * sum(W ** 2)`` over the kernel and every Affine weight.
    """

    def __init__(self, conv_W, conv_b, affine, use_bn, *, stride=1, pad=0, pool=2, momentum=0.9, eps=1e-6,
                 norm_forward=None, weight_decay_lambda=0.0):
        self.conv = Convolution(conv_W, conv_b, stride, pad)
        self.affines = [Affine(W, b) for W, b in affine]
        widths = [self.conv.W.shape[-1]] + [a.W.shape[1] for a in self.affines[:-1]]
        self.bns = ([ChannelBatchNorm(np.ones(c), np.zeros(c), momentum, eps) for c in widths[:1]]
                    + [BatchNorm(np.ones(c), np.zeros(c), momentum, eps) for c in widths[1:]]) if use_bn else []
        self.relus = [Relu() for _ in widths]
        self.pool = Pooling(pool)
        self.last = SoftmaxWithLoss()
        self.norm_forward, self.lam = norm_forward, weight_decay_lambda

    def _norm(self, i, h, train_flg):
        if self.norm_forward is not None:
            return self.norm_forward(i, h, train_flg)
        return self.bns[i].forward(h, train_flg) if self.bns else h

    def predict(self, x, train_flg):
        """Args: x ``[N, H, W, C]``; train_flg. Returns: ``[N, K]`` logits."""
        h = self.relus[0].forward(self._norm(0, self.conv.forward(np.asarray(x, np.float64)), train_flg))
        h = self.pool.forward(h)
        self.pooled_shape = h.shape
        h = h.reshape(h.shape[0], -1)
        for i, aff in enumerate(self.affines[:-1]):
            h = self.relus[i + 1].forward(self._norm(i + 1, aff.forward(h), train_flg))
        return self.affines[-1].forward(h)

    def gradient(self, x, t):
        """One training forward and backward. Returns: ``(loss, dx)``; layer gradients stored on the layers."""
        decay = 0.5 * self.lam * (np.sum(self.conv.W ** 2) + sum(np.sum(a.W ** 2) for a in self.affines))
        value = self.last.forward(self.predict(x, True), t) + decay
        d = self.affines[-1].backward(self.last.backward())
        for i in reversed(range(len(self.affines) - 1)):
            d = self.relus[i + 1].backward(d)
            if self.bns:
                d = self.bns[i + 1].backward(d)
            d = self.affines[i].backward(d)
        d = self.relus[0].backward(self.pool.backward(d.reshape(self.pooled_shape)))
        if self.bns:
            d = self.bns[0].backward(d)
        return value, self.conv.backward(d)
