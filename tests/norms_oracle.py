"""Float64 NumPy oracles of the norms (written from the papers' formulas) and small helpers shared by the
norm tests. Nothing here calls the norms under test."""

import jax
import jax.numpy as jnp
import numpy as np

from bnjax import layers


def _np_renorm(x, gamma, beta, mean, var, *, r_max, d_max, momentum, eps, mode="var"):
    """Ioffe (2017) Algorithm 1 in float64 NumPy; features on the last axis, every other axis reduced.

    Returns y, new running mean, new running var, and the unclipped / clipped r and d."""
    x = np.asarray(x, np.float64)
    red = tuple(range(x.ndim - 1))
    mu_b = x.mean(red)
    var_b = ((x - mu_b) ** 2).mean(red)  # biased
    sigma_b = np.sqrt(var_b + eps)
    sigma = np.sqrt(var + eps)
    r_raw = sigma_b / sigma
    d_raw = (mu_b - mean) / sigma
    r = np.clip(r_raw, 1.0 / r_max, r_max)
    d = np.clip(d_raw, -d_max, d_max)
    y = gamma * ((x - mu_b) / sigma_b * r + d) + beta
    new_mean = momentum * mean + (1 - momentum) * mu_b
    if mode == "var":
        new_var = momentum * var + (1 - momentum) * var_b
    else:
        sigma_new = momentum * sigma + (1 - momentum) * sigma_b
        new_var = sigma_new ** 2 - eps
    return y, new_mean, new_var, (r_raw, d_raw), (r, d)


def _np_bn_eval(x, gamma, beta, mean, var, eps):
    g = 1.0 if gamma is None else gamma
    b = 0.0 if beta is None else beta
    return g * (np.asarray(x, np.float64) - mean) / np.sqrt(var + eps) + b


def _np_ghost(x, k, gamma, beta, mean, var, *, momentum, eps, mask=None):
    """Ghost BN oracle for one device: groups of k consecutive rows (axis 0; the last one smaller), masked rows
    dropped from their group, empty groups skipped. Returns y (NaN at masked rows), the new running statistics,
    and the per-group (count, mean, var) list (for pooling across devices)."""
    x = np.asarray(x, np.float64)
    n = x.shape[0]
    c = x.shape[-1]
    y = np.full_like(x, np.nan)
    groups = []
    for start in range(0, n, k):
        rows = np.arange(start, min(start + k, n))
        if mask is not None:
            rows = rows[np.asarray(mask, bool)[rows]]
        if len(rows) == 0:
            continue
        g = x[rows].reshape(-1, c)
        mu, v = g.mean(0), g.var(0)
        y[rows] = gamma * (x[rows] - mu) / np.sqrt(v + eps) + beta
        groups.append((g.shape[0], mu, v))
    new_mean, new_var = _np_pool(groups, mean, var, momentum)
    return y, new_mean, new_var, groups


def _np_pool(groups, mean, var, momentum):
    if not groups:  # no valid row anywhere: no update
        return mean, var
    cnt = np.array([g[0] for g in groups], np.float64)
    mu = sum(n * m for n, m, _ in groups) / cnt.sum()
    v = sum(n * vv for n, _, vv in groups) / cnt.sum()  # count-weighted mean of the group variances
    return momentum * mean + (1 - momentum) * mu, momentum * var + (1 - momentum) * v


def _bn_params(gamma, beta, dtype=None):
    as_ = (lambda a: None if a is None else jnp.asarray(a, dtype))
    return layers.BatchNormParams(as_(gamma), as_(beta))


def _a(v):
    return np.asarray(v)


def _shard_map():
    try:
        return jax.shard_map
    except AttributeError:
        from jax.experimental.shard_map import shard_map

        return shard_map


def _np_flags(kind, x, gamma, beta, mean, var, *, train, update_stats=None, use_batch_stats=None, momentum, eps,
              k=None, unbiased=False, r_max=None, d_max=None, step=0):
    """What every norm does for one combination of its flags, in float64 NumPy from the formulas: batch norm's
    ``use_batch_stats`` / ``update_stats`` default to ``train``; Batch Renorm and Ghost BN normalise with batch
    (or group) statistics exactly when ``train`` and update when ``update_stats`` (default ``train``).

    Returns ``(y, new_mean, new_var, new_step)``; the running statistics unchanged when no update is made."""
    x = np.asarray(x, np.float64)
    update = train if update_stats is None else update_stats
    batch = train if use_batch_stats is None else use_batch_stats
    if kind == "batch_norm":
        mu_b, var_b = x.mean(0), x.var(0)
        n = x.shape[0]
        y = _np_bn_eval(x, gamma, beta, mu_b, var_b, eps) if batch else _np_bn_eval(x, gamma, beta, mean, var, eps)
        stored = var_b * n / (n - 1) if unbiased else var_b
        new = (momentum * mean + (1 - momentum) * mu_b, momentum * var + (1 - momentum) * stored)
        return (y, *(new if update else (mean, var)), step)
    if kind == "batch_renorm":
        y_t, new_mean, new_var, _, _ = _np_renorm(x, gamma, beta, mean, var, r_max=r_max, d_max=d_max,
                                                  momentum=momentum, eps=eps)
        y = y_t if train else _np_bn_eval(x, gamma, beta, mean, var, eps)
        return (y, new_mean, new_var, step + 1) if update else (y, mean, var, step)
    y_t, new_mean, new_var, _ = _np_ghost(x, k, gamma, beta, mean, var, momentum=momentum, eps=eps)
    y = y_t if train else _np_bn_eval(x, gamma, beta, mean, var, eps)
    return (y, new_mean, new_var, step) if update else (y, mean, var, step)
