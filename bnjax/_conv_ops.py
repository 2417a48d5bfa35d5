"""The conv net's two layer operations with derivatives of their own: ``convolve`` (NHWC x HWIO) and
``max_pool`` (``size x size``, stride ``size``). Private to ``bnjax.convnet``; tested through it
(tests/test_convnet.py)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

Array = jax.Array


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def convolve(x: Array, W: Array, stride: int, pad: int) -> Array:
    """``lax.conv_general_dilated`` without dilation; its derivative in ``W`` is a matmul (``_convolve_jvp``).

    Args:
      x: ``[N, H, W, C_in]`` images.
      W: ``[fh, fw, C_in, C_out]`` kernel (HWIO), of ``x``'s dtype.
      stride: the step in both spatial axes.
      pad: zeros added on every side.

    Returns:
      ``[N, H_out, W_out, C_out]``; matmul precision is the caller's ``jax.default_matmul_precision``.
    """
    return lax.conv_general_dilated(x, W, window_strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(convolve.defjvp, symbolic_zeros=True)
def _convolve_jvp(stride: int, pad: int, primals: tuple, tangents: tuple) -> tuple[Array, Array]:
    # The tangent in W is written as the input's patches (im2col) times the kernel, so the kernel gradient (its
    # transpose) is one matmul. As a convolution, XLA's CPU backend lays that gradient out as a 24x24-window
    # convolution that runs ~10x slower inside a training loop (lax.fori_loop) than in a lone step (measured).
    (x, W), (dx, dW) = primals, tangents
    y = convolve(x, W, stride, pad)
    tangent = jnp.zeros_like(y)
    if not isinstance(dW, SymbolicZero):
        fh, fw, cin, cout = W.shape
        n, ho, wo, _ = y.shape
        xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        patches = jnp.stack([xp[:, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride]
                             for i in range(fh) for j in range(fw)], axis=3)  # [N, Ho, Wo, fh * fw, C_in]
        tangent = patches.reshape(n, ho, wo, fh * fw * cin) @ dW.reshape(fh * fw * cin, cout)
    if not isinstance(dx, SymbolicZero):
        tangent = tangent + convolve(dx, W, stride, pad)
    return y, tangent


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def max_pool(h: Array, size: int) -> Array:
    """``size x size`` max pooling with stride ``size``, NHWC; a window with a NaN gives NaN.

    Its derivative routes each window's tangent to the window's first maximum, as the book's ``Pooling``
    backward does (``_max_pool_jvp``).

    Args:
      h: ``[N, H, W, C]``; ``size`` divides ``H`` and ``W``.
      size: the window's side and stride.

    Returns:
      ``[N, H / size, W / size, C]``.
    """
    n, hh, ww, c = h.shape
    return jnp.max(h.reshape(n, hh // size, size, ww // size, size, c), axis=(2, 4))


@max_pool.defjvp
def _max_pool_jvp(size: int, primals: tuple, tangents: tuple) -> tuple[Array, Array]:
    # jnp.max's own derivative divides by the number of inputs equal to the maximum; XLA may recompute the input
    # in several fusions, rounded differently (a fused multiply-add in one only): none matches and the gradient
    # is inf or NaN (seen on a CPU). One running comparison picks a single position per window instead (the
    # first maximum, NaN propagating), so the tangent goes to exactly one element whatever the rounding.
    (h,), (dh,) = primals, tangents
    n, hh, ww, c = h.shape
    win = h.reshape(n, hh // size, size, ww // size, size, c)
    best, first = win[:, :, 0, :, 0, :], jnp.zeros((n, hh // size, ww // size, c), jnp.int32)
    for k in range(1, size * size):
        value = win[:, :, k // size, :, k % size, :]
        take = (value > best) | jnp.isnan(value)
        best, first = jnp.where(take, value, best), jnp.where(take, k, first)
    # A one-hot mask over each window and a sum: its transpose is one elementwise select over the input.
    where = first[:, :, None, :, None, :] == jnp.arange(size * size).reshape(1, 1, size, 1, size, 1)
    tangent = jnp.sum(jnp.where(where, dh.reshape(win.shape), jnp.zeros((), dh.dtype)), axis=(2, 4))
    return best, tangent
