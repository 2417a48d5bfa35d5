"""An independent NumPy oracle: the book's layers written from the formulas, with hand-written backward passes.

Nothing here imports bnjax. Float64 by default, as the book. Conventions follow ``shared/book_protocol.md``:
eps 1e-6, running = momentum * running + (1 - momentum) * batch with the biased variance, ReLU gradient 0 at 0,
softmax cross-entropy gradient (softmax - onehot) / N.
"""

from __future__ import annotations

import numpy as np


class BatchNorm:
    def __init__(self, gamma, beta, momentum=0.9, eps=1e-6, running_mean=None, running_var=None):
        self.gamma, self.beta = np.array(gamma, np.float64), np.array(beta, np.float64)
        self.momentum, self.eps = momentum, eps
        d = self.gamma.shape[0]
        self.running_mean = np.zeros(d) if running_mean is None else np.array(running_mean, np.float64)
        self.running_var = np.zeros(d) if running_var is None else np.array(running_var, np.float64)

    def forward(self, x, train_flg=True):
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
    def __init__(self, W, b):
        self.W, self.b = np.array(W, np.float64), np.array(b, np.float64)

    def forward(self, x):
        self.x = x
        return x @ self.W + self.b

    def backward(self, dout):
        self.dW = self.x.T @ dout
        self.db = dout.sum(axis=0)
        return dout @ self.W.T


class Relu:
    def forward(self, x):
        self.mask = x <= 0
        out = x.copy()
        out[self.mask] = 0
        return out

    def backward(self, dout):
        dout = dout.copy()
        dout[self.mask] = 0
        return dout


def softmax(x):
    x = x - x.max(axis=1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=1, keepdims=True)


class SoftmaxWithLoss:
    def forward(self, x, t):
        self.y, self.t = softmax(x), t
        n = x.shape[0]
        return -np.mean(np.log(self.y[np.arange(n), t]))

    def backward(self):
        n = self.t.shape[0]
        dx = self.y.copy()
        dx[np.arange(n), self.t] -= 1
        return dx / n


class Net:
    """MultiLayerNetExtend (ReLU, optional BN, no dropout, no weight decay unless given)."""

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
        h = x
        for i, aff in enumerate(self.affines[:-1]):
            h = aff.forward(h)
            if self.bns:
                h = self.bns[i].forward(h, train_flg)
            h = self.relus[i].forward(h)
        return self.affines[-1].forward(h)

    def loss(self, x, t, train_flg=True):
        decay = 0.5 * self.lam * sum(np.sum(a.W**2) for a in self.affines)
        return self.last.forward(self.predict(x, train_flg), t) + decay

    def gradient(self, x, t):
        """One training forward (updating running statistics once) and backward; returns the loss."""
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
        self.gradient(x, t)
        for a in self.affines:
            a.W -= lr * (a.dW + self.lam * a.W)
            a.b -= lr * a.db
        for bn in self.bns:
            bn.gamma -= lr * bn.dgamma
            bn.beta -= lr * bn.dbeta

    def accuracy(self, x, t):
        with np.errstate(all="ignore"):
            return float(np.mean(np.argmax(self.predict(x, False), axis=1) == t))
