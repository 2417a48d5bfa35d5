"""The book's ch. 7 ``SimpleConvNet`` as pure functions, with the API of ``bnjax.model``.

``Conv -> [norm] -> activation -> max pool -> flatten``, then ``Affine -> [norm] -> activation -> [Dropout]`` for
each hidden size and an ``Affine`` to the scores (the book: 30 filters 5x5, ReLU, 2x2 pool, Affine 100, ReLU,
Affine 10). Images are NHWC and the kernel HWIO (``[fh, fw, C_in, num_filters]``); the norm after the
convolution gets ``[N, H, W, C]``, channels last (batch norm: each channel over the batch and both spatial axes;
group norm: each image over space and a group of channels). The structure is a ``ConvNetConfig`` (static,
hashable, first argument of every function); parameters (``ConvNetParams``) and state (``ConvNetState``) are
pytrees, so ``jax.vmap`` over ``init`` builds a stack of models. Flattening is in NHWC order (height, width,
channel), not the book's NCHW: the same network up to a permutation of the first Affine's rows. The convolution
and the pooling have derivatives of their own (``bnjax/_conv_ops.py``: robust and fast on a CPU).
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bnjax import layers, norms
from bnjax._conv_ops import convolve, max_pool
from bnjax.model import ACTIVATIONS, _resolve_norm

Array = jax.Array

__all__ = ["ConvNetConfig", "ConvParams", "ConvNetParams", "ConvNetState", "init", "apply", "loss", "predict",
           "accuracy", "recalibrate", "fold", "num_flops", "activation_floats"]


class _ConvNetFields(NamedTuple):
    input_shape: tuple[int, int, int] = (28, 28, 1)
    num_filters: int = 30
    filter_size: int = 5
    stride: int = 1
    pad: int = 0
    pool_size: int = 2
    hidden_sizes: tuple[int, ...] = (100,)
    output_size: int = 10
    activation: str = "relu"
    norm: Any = None
    dropout_ratio: float = 0.0
    dropout_inverted: bool = True


class ConvNetConfig(_ConvNetFields):
    """Static structure of the conv net (defaults: the book's ``SimpleConvNet`` on 28x28x1 images, no norm).

    A NamedTuple (hashable, a static argument of ``jax.jit``); ``norm=True`` is resolved once, when the config is
    built (also by ``_replace``/``replace``), to ``layers.book_batch_norm()``, ``False`` to ``None``.

    Attributes:
      input_shape: ``(H, W, C)`` of one image.
      num_filters, filter_size, stride, pad: the convolution (square filters; ``pad`` zeros on every side).
      pool_size: max pooling ``pool_size x pool_size`` with stride ``pool_size``; it must divide the conv output.
      hidden_sizes: widths of the hidden Affine layers after the pooling.
      output_size: classes.
      activation: ``'relu'`` or ``'sigmoid'``, after the conv and after each hidden Affine.
      norm: a norm value or ``None`` (``True``/``False`` as above), after the conv (per channel) and after each
        hidden Affine.
      dropout_ratio, dropout_inverted: dropout after each hidden Affine's activation (as ``model.MLPConfig``).
    """

    __slots__ = ()

    def __new__(cls, *args: Any, **kwargs: Any) -> "ConvNetConfig":
        self = super().__new__(cls, *args, **kwargs)
        fields = self._asdict()
        for name in ("input_shape", "hidden_sizes"):  # a list works too, but jit keys on the config: hashable
            if not isinstance(fields[name], (tuple, str, bytes)):
                try:
                    fields[name] = tuple(fields[name])
                except TypeError:
                    pass  # check() names the field
        fields["norm"] = _resolve_norm(fields["norm"])
        return tuple.__new__(cls, tuple(fields.values()))

    @classmethod
    def _make(cls, iterable: Any) -> "ConvNetConfig":
        # NamedTuple's _make (and so _replace) bypasses __new__: route it through the resolution above.
        return cls(*iterable)

    def replace(self, **changes: Any) -> "ConvNetConfig":
        """A copy with ``changes`` (``norm=True`` is resolved as at construction)."""
        return self._replace(**changes)

    # Shapes (on a config that passes check()).
    @property
    def input_size(self) -> int:
        """Features of one flat image row, ``H * W * C``."""
        return math.prod(int(s) for s in self.input_shape)

    @property
    def kernel_shape(self) -> tuple[int, int, int, int]:
        """The convolution's HWIO kernel shape ``(fh, fw, C_in, num_filters)``."""
        return int(self.filter_size), int(self.filter_size), int(self.input_shape[2]), int(self.num_filters)

    @property
    def conv_shape(self) -> tuple[int, int, int]:
        """``(H_out, W_out, num_filters)`` of the convolution's output (floor, as the book's ``Convolution``)."""
        (h, w, _), f, s, p = self.input_shape, self.filter_size, self.stride, self.pad
        return int((h + 2 * p - f) // s + 1), int((w + 2 * p - f) // s + 1), int(self.num_filters)

    @property
    def pool_shape(self) -> tuple[int, int, int]:
        """``(H, W, num_filters)`` after the max pooling."""
        h, w, c = self.conv_shape
        return h // int(self.pool_size), w // int(self.pool_size), c

    @property
    def affine_sizes(self) -> list[int]:
        """The Affine layers' widths, input first: ``[pooled features, *hidden_sizes, output_size]``."""
        return [math.prod(self.pool_shape), *[int(h) for h in self.hidden_sizes], int(self.output_size)]

    def check(self) -> "ConvNetConfig":
        """Check that the configuration can build a network.

        Returns:
          the config itself.

        Raises:
          ValueError: naming the field that cannot be used.
        """
        if not (self.norm is None or isinstance(self.norm, layers.Norm)):
            raise ValueError(f"norm must be a norm value (layers.batch_norm(), layers.batch_renorm(), "
                             f"layers.ghost_batch_norm(...)), True, False or None, got {self.norm!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r}: expected one of {sorted(ACTIVATIONS)}")
        shape = self.input_shape
        if not (isinstance(shape, tuple) and len(shape) == 3 and all(_is_int(s) and s >= 1 for s in shape)):
            raise ValueError(f"input_shape must be (H, W, C), three positive integers, got {shape!r}")
        for name in ("num_filters", "filter_size", "stride", "pool_size", "output_size"):
            value = getattr(self, name)
            if not (_is_int(value) and value >= 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (_is_int(self.pad) and self.pad >= 0):
            raise ValueError(f"pad must be an integer >= 0, got {self.pad!r}")
        hs = self.hidden_sizes
        if not (isinstance(hs, tuple) and all(_is_int(h) and h >= 1 for h in hs)):
            raise ValueError(f"hidden_sizes must be a tuple of positive integers, got {hs!r}")
        h, w, _ = shape
        if self.filter_size > min(h, w) + 2 * self.pad:
            raise ValueError(f"filter_size={self.filter_size} is larger than the padded image "
                             f"({h + 2 * self.pad}x{w + 2 * self.pad}: input_shape {shape}, pad {self.pad})")
        ch, cw, _ = self.conv_shape
        if ch % self.pool_size or cw % self.pool_size:
            raise ValueError(f"pool_size={self.pool_size} does not divide the conv output {ch}x{cw}; choose a "
                             "pool_size, filter_size, stride or pad that makes it divide")
        if not 0.0 <= self.dropout_ratio < 1.0:
            raise ValueError(f"dropout_ratio must be in [0, 1), got {self.dropout_ratio}")
        return self


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class ConvParams(NamedTuple):
    """A convolution's kernel ``W [fh, fw, C_in, C_out]`` (HWIO) and bias ``b [C_out]``."""

    W: Array
    b: Array


class ConvNetParams(NamedTuple):
    """Trainable parameters.

    Attributes:
      conv: the convolution's ``ConvParams``.
      affine: one ``layers.AffineParams`` per Affine, hidden layers first, the output layer last.
      batch_norm: the norm's parameters after the conv, then one per hidden Affine; ``()`` without a norm.
    """

    conv: ConvParams
    affine: tuple
    batch_norm: tuple


class ConvNetState(NamedTuple):
    """Non-trained state: the norm's state after the conv, then one per hidden Affine (empty without a norm)."""

    batch_norm: tuple


def _checked_config(config: Any, who: str) -> ConvNetConfig:
    if not isinstance(config, ConvNetConfig):
        raise TypeError(f"convnet.{who}(config, ...): config comes first and must be a ConvNetConfig, got "
                        f"{type(config).__name__}")
    return config.check()


def init(config: ConvNetConfig, key: Array, *, weight_init: Any = "he", weight_scale: float | Array = 1.0,
         dtype: Any = jnp.float32) -> tuple[ConvNetParams, ConvNetState]:
    """Initialise the network: ``W = std * normal``, biases 0, the norm's own initial parameters and state.

    Each layer's std follows ``model.init``'s policy with ``fan_in = fh * fw * C_in`` for the convolution:
    ``weight_init=None``: ``weight_scale`` for every layer (the book's ``SimpleConvNet`` has
    ``weight_init_std=0.01``); a number: ``weight_scale * weight_init``; ``'he'``/``'relu'`` or
    ``'xavier'``/``'sigmoid'``: ``layers.resolve_init_std``'s std, the weights then times ``weight_scale``.

    Args:
      config: the network's structure.
      key: ``jax.random`` key.
      weight_init: the per-layer policy (above).
      weight_scale: a factor on it; may be a traced scalar (vmap over scales).
      dtype: parameter dtype.

    Returns:
      ``(params, state)``.

    Raises:
      TypeError: if ``config`` is not a ``ConvNetConfig`` (the key comes second).
      ValueError: if ``config`` cannot build a network, ``weight_init`` is an unknown name, or the std or
        ``weight_scale`` is not a scalar.
    """
    config = _checked_config(config, "init")
    scale = jnp.asarray(weight_scale, dtype)
    if scale.ndim != 0:
        raise ValueError(f"weight_scale must be a scalar per model (vmap for several), got shape {scale.shape}")
    kernel = config.kernel_shape
    sizes = config.affine_sizes
    shapes = [kernel, *zip(sizes[:-1], sizes[1:])]
    fan_ins = [kernel[0] * kernel[1] * kernel[2], *sizes[:-1]]
    # One normal draw for every weight, sliced: under vmap over hundreds of models one draw per layer compiles
    # and runs slower (as model.init).
    noise = jax.random.normal(key, (sum(math.prod(s) for s in shapes),), dtype)
    weights, offset = [], 0
    for shape, fan_in in zip(shapes, fan_ins):
        if weight_init is None:
            std = scale
        elif isinstance(weight_init, str):
            std = jnp.asarray(layers.resolve_init_std(weight_init, fan_in), dtype)
        else:
            std = scale * jnp.asarray(layers.resolve_init_std(weight_init, fan_in), dtype)
        if std.ndim != 0:
            raise ValueError(f"weight_init must be a scalar per model (vmap for several), got shape {std.shape}")
        W = std * noise[offset : offset + math.prod(shape)].reshape(shape)
        if isinstance(weight_init, str):  # the named policy's weights, times the scale
            W = W * scale
        weights.append(W)
        offset += math.prod(shape)
    conv = ConvParams(W=weights[0], b=jnp.zeros((kernel[3],), dtype))
    affine = tuple(layers.AffineParams(W=W, b=jnp.zeros((W.shape[1],), dtype)) for W in weights[1:])
    norm_params, norm_state = [], []
    if config.norm is not None:
        for size in [kernel[3], *sizes[1:-1]]:
            p, s = config.norm.init(size, dtype=dtype)
            norm_params.append(p)
            norm_state.append(s)
    return ConvNetParams(conv, affine, tuple(norm_params)), ConvNetState(tuple(norm_state))


def apply(config: ConvNetConfig, params: ConvNetParams, state: ConvNetState, x: Array, *, train: bool,
          key: Array | None = None, norm_kwargs: dict | None = None) -> tuple[Array, ConvNetState]:
    """Scores of the network.

    Args:
      config: the structure ``params`` were made with.
      params, state: from ``init``.
      x: ``[N, H * W * C]`` (flat rows, e.g. MNIST's 784, read in row-major ``(H, W, C)`` order) or
        ``[N, H, W, C]``.
      train: the book's ``train_flg``: batch statistics + running update + dropout (True), or running
        statistics, no update, no dropout (False).
      key: ``jax.random`` key, needed only for dropout at training time.
      norm_kwargs: extra keyword arguments of every norm's ``apply`` (e.g. ``{"momentum": m}``); ``None`` for
        none.

    Returns:
      ``(logits [N, output_size], new_state)``.

    Raises:
      TypeError: ``config`` not a ``ConvNetConfig`` or ``params``/``state`` not this module's.
      ValueError: ``x`` of another shape, ``config``, ``params`` and ``state`` that disagree, dropout at training
        time without a key.
    """
    config = _checked_config(config, "apply")
    return _forward(config, params, state, x, train, key, norm_kwargs)


def _images(config: ConvNetConfig, x: Any) -> Array:
    """``x`` as ``[N, H, W, C]``, or a ValueError naming the shapes accepted."""
    x = jnp.asarray(x)
    shape = tuple(int(s) for s in config.input_shape)
    if x.ndim == 2 and x.shape[1] == config.input_size:
        return x.reshape((x.shape[0], *shape))
    if x.ndim == 4 and tuple(x.shape[1:]) == shape:
        return x
    raise ValueError(f"convnet.apply: x must be [N, {config.input_size}] (flat rows) or "
                     f"[N, {', '.join(map(str, shape))}] (NHWC), got shape {tuple(x.shape)}")


def _check_structure(config: ConvNetConfig, params: Any, state: Any) -> None:
    """A clear error when ``params``/``state`` were not made by ``init`` with ``config``."""
    if not isinstance(params, ConvNetParams) or not isinstance(state, ConvNetState):
        raise TypeError(f"convnet: params and state must be the ConvNetParams and ConvNetState convnet.init "
                        f"returns, got {type(params).__name__} and {type(state).__name__}")
    num_norms = 1 + len(config.hidden_sizes) if config.norm is not None else 0
    if len(params.batch_norm) != num_norms or len(state.batch_norm) != num_norms:
        raise ValueError("convnet: config, params and state disagree on the norm (use the pair init returned with "
                         "the same config)")
    sizes = config.affine_sizes
    shapes = [tuple(a.W.shape) for a in params.affine]
    if tuple(params.conv.W.shape) != config.kernel_shape or shapes != list(zip(sizes[:-1], sizes[1:])):
        raise ValueError(f"convnet: params have kernel {tuple(params.conv.W.shape)} and Affine weights {shapes}, "
                         f"config expects kernel {config.kernel_shape} and {list(zip(sizes[:-1], sizes[1:]))} (use "
                         "the params init returned with the same config)")


def _conv(conv: ConvParams, x: Array, stride: int, pad: int, *, bias: bool = True) -> Array:
    """NHWC x HWIO convolution, plus the bias when ``bias``; precision is the caller's
    ``jax.default_matmul_precision``."""
    dt = jnp.promote_types(x.dtype, conv.W.dtype)
    y = convolve(x.astype(dt), conv.W.astype(dt), stride, pad)
    return y + conv.b if bias else y


def _forward(config, params, state, x, train, key, norm_kwargs=None):
    _check_structure(config, params, state)
    x = _images(config, x)
    norm = config.norm
    act = ACTIVATIONS[config.activation]
    hidden_layers = params.affine[:-1]
    dropout = config.dropout_ratio > 0.0
    keys = (jax.random.split(key, len(hidden_layers)) if (train and dropout and key is not None)
            else [None] * len(hidden_layers))
    new_norm = []

    def normalise(i, h):
        if norm is None:
            return h
        h, s = norm.apply(params.batch_norm[i], state.batch_norm[i], h, train=train, **(norm_kwargs or {}))
        new_norm.append(s)
        return h

    size = int(config.pool_size)
    h = _conv(params.conv, x, int(config.stride), int(config.pad), bias=norm is not None)
    if norm is None:
        # Both activations increase monotonically, as does adding b in floating point: pool(act(z + b)) equals
        # act(pool(z) + b) (bit for bit for ReLU), and the bias, the activation and the bias gradient's
        # reduction (slow in a vmapped step on a CPU) then touch a quarter of the values.
        h = act(max_pool(h, size) + params.conv.b)
    else:
        h = max_pool(act(normalise(0, h)), size)
    h = h.reshape(h.shape[0], -1)
    for i, aff in enumerate(hidden_layers):
        h = act(normalise(i + 1, layers.affine_apply(aff, h)))
        if dropout:
            h = layers.dropout_apply(h, keys[i], config.dropout_ratio, train=train, inverted=config.dropout_inverted)
    logits = layers.affine_apply(params.affine[-1], h)
    return logits, ConvNetState(batch_norm=tuple(new_norm))


def loss(config: ConvNetConfig, params: ConvNetParams, state: ConvNetState, x: Array, labels: Array, *,
         train: bool, key: Array | None = None, weight_decay: float | Array = 0.0,
         norm_kwargs: dict | None = None) -> tuple[Array, ConvNetState]:
    """Softmax cross-entropy plus ``weight_decay / 2 * sum(W ** 2)`` over the conv kernel and every Affine weight
    (the book's); use ``jax.value_and_grad(loss, argnums=1, has_aux=True)``.

    Args:
      config, params, state, x, train, key, norm_kwargs: as ``apply``.
      labels: ``[N]`` integer classes.
      weight_decay: the L2 coefficient (the book's ``weight_decay_lambda``); may be traced.

    Returns:
      ``(loss, new_state)``: the scalar loss and the state ``apply`` returns.

    Raises:
      TypeError, ValueError: as ``apply``.
    """
    logits, new_state = apply(config, params, state, x, train=train, key=key, norm_kwargs=norm_kwargs)
    value = layers.softmax_cross_entropy(logits, labels)
    decay = jnp.sum(jnp.square(params.conv.W)) + sum(jnp.sum(jnp.square(a.W)) for a in params.affine)
    return value + 0.5 * weight_decay * decay, new_state


def predict(config: ConvNetConfig, params: ConvNetParams, state: ConvNetState, x: Array) -> Array:
    """Predicted classes in evaluation mode (running statistics, no update, no dropout).

    Args:
      config, params, state, x: as ``apply``.

    Returns:
      ``[N]`` classes (a row with a NaN score counts as the first NaN's class, as NumPy's argmax).

    Raises:
      TypeError, ValueError: as ``apply``.
    """
    logits, _ = apply(config, params, state, x, train=False)
    return jnp.argmax(logits, axis=-1)


def accuracy(config: ConvNetConfig, params: ConvNetParams, state: ConvNetState, x: Array, labels: Array) -> Array:
    """Share of ``x`` classified as ``labels``, in evaluation mode.

    Args:
      config, params, state, x: as ``apply``.
      labels: ``[N]`` integer classes.

    Returns:
      a float32 scalar in [0, 1].

    Raises:
      TypeError, ValueError: as ``apply``.
    """
    return jnp.mean((predict(config, params, state, x) == labels).astype(jnp.float32))


def recalibrate(config: ConvNetConfig, params: ConvNetParams, state: ConvNetState, batches: Any, *,
                key: Array | None = None) -> ConvNetState:
    """Precise statistics: every norm layer's running statistics set to the equal-weight mean of its batch
    statistics over ``batches`` (``norms.recalibrate`` on this network; see ``model.recalibrate``).

    Args:
      config, params, state: the network.
      batches: ``[num_batches, N, input_size]`` or ``[num_batches, N, H, W, C]``, or an iterable of batches as
        ``apply`` takes them.
      key: a ``jax.random`` key when the network has dropout.

    Returns:
      the new ``ConvNetState``; ``state`` itself without a norm with running statistics.

    Raises:
      TypeError, ValueError: as ``norms.recalibrate`` and ``apply``; dropout without a key.
    """
    config = _checked_config(config, "recalibrate")
    _check_structure(config, params, state)
    if config.dropout_ratio > 0 and key is None:
        raise ValueError("convnet.recalibrate: the network has dropout; pass a jax.random key")
    return norms.recalibrate(functools.partial(apply, config), params, state, batches, key=key)


def fold(config: ConvNetConfig, params: ConvNetParams,
         state: ConvNetState) -> tuple[ConvNetConfig, ConvNetParams, ConvNetState]:
    """The same network in evaluation mode without norm layers: the conv's norm folded into the kernel
    (``layers.fold_conv_batch_norm``), each hidden norm into the Affine before it (``layers.fold_batch_norm``).

    Args:
      config, params, state: the network.

    Returns:
      ``(config without a norm, params, empty state)`` whose ``apply(..., train=False)`` gives the evaluation
      outputs of the original (to float rounding).

    Raises:
      TypeError, ValueError: ``config``, ``params`` and ``state`` that disagree (checked before folding); a norm
        without running statistics, or statistics the fold functions refuse.
    """
    config = _checked_config(config, "fold")
    _check_structure(config, params, state)
    plain = config._replace(norm=None)
    norm = config.norm
    if norm is None:
        return plain, params, ConvNetState(())
    W, b = layers.fold_conv_batch_norm(params.conv.W, params.conv.b, norm, params.batch_norm[0],
                                       state.batch_norm[0])
    hidden = tuple(layers.fold_batch_norm(a, norm, p, s)
                   for a, p, s in zip(params.affine[:-1], params.batch_norm[1:], state.batch_norm[1:]))
    return plain, ConvNetParams(ConvParams(W, b), hidden + (params.affine[-1],), ()), ConvNetState(())


def num_flops(config: ConvNetConfig, batch_size: int, *, backward: bool = False) -> int:
    """Multiply-add FLOPs (2 per MAC) of the convolution and the Affine layers for one batch, ignoring
    elementwise work (norms, activations, pooling).

    Args:
      config: the network.
      batch_size: images per batch.
      backward: add the weight gradients of every layer and the input gradients of all but the first (the
        convolution's input, the images, needs none), as ``model.num_flops``.

    Returns:
      the FLOP count.

    Raises:
      TypeError, ValueError: a config that cannot build a network.
    """
    config = _checked_config(config, "num_flops")
    conv = math.prod(config.conv_shape) * math.prod(config.kernel_shape[:3])  # MACs per image
    sizes = config.affine_sizes
    affine = sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
    fwd = 2 * batch_size * (conv + affine)
    return fwd + 2 * batch_size * (conv + 2 * affine) if backward else fwd


def activation_floats(config: ConvNetConfig, batch_size: int) -> int:
    """A generous count of the floats one training step of one model keeps alive, for memory planning.

    Per image: the input, eight values per unit of the convolution's output (before and after the norm and the
    activation, the pooling's window mask, their gradients) and six per unit of the pooled map and of every
    Affine's output. The residuals autodiff keeps grow by less per image (the book's net: ~110,000 floats with
    batch norm, ~49,000 without, against 165,604 here); the gradients and temporaries of the backward pass come
    on top. Copies of the weights the backward pass keeps are per model, not per image, and not counted here.

    Args:
      config: the network.
      batch_size: images per batch.

    Returns:
      the count.

    Raises:
      TypeError, ValueError: a config that cannot build a network.
    """
    config = _checked_config(config, "activation_floats")
    return batch_size * (config.input_size + 8 * math.prod(config.conv_shape) + 6 * sum(config.affine_sizes))
