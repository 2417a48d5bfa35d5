"""The book's ``MultiLayerNetExtend`` as pure functions.

``Affine -> [norm] -> activation -> [Dropout]`` for each hidden layer, then ``Affine`` to the scores.
The network's *structure* (sizes, activation, which norm is used if any, the dropout ratio) is an
``MLPConfig``: static, hashable, passed first to every function, as a Flax module is. The trained parameters
(``MLPParams``) and the running statistics (``MLPState``) are plain pytrees of arrays, so ``weight_scale``
may be an array: ``jax.vmap(lambda s: init(config, key, weight_init=None, weight_scale=s))`` builds a stack
of models, one per scale.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bnjax import layers, norms

Array = jax.Array

__all__ = ["MLPConfig", "MLPParams", "MLPState", "ACTIVATIONS", "init", "apply", "hidden", "loss", "predict", "accuracy",
           "recalibrate", "fold", "num_flops"]

ACTIVATIONS = {"relu": layers.relu, "sigmoid": layers.sigmoid}


class _MLPFields(NamedTuple):
    input_size: int = 784
    hidden_sizes: tuple[int, ...] = (100, 100, 100, 100, 100)
    output_size: int = 10
    activation: str = "relu"
    norm: Any = None
    dropout_ratio: float = 0.0
    dropout_inverted: bool = True


def _resolve_norm(norm: Any) -> Any:
    """``True`` -> the book's BatchNorm, ``False`` -> ``None``; anything else as given (``check`` judges it)."""
    if isinstance(norm, (bool, np.bool_)):
        return layers.book_batch_norm() if bool(norm) else None
    return norm


class MLPConfig(_MLPFields):
    """Static structure of the network (defaults: the book's 784-100x5-10 ReLU net without a norm).

    A NamedTuple (hashable, a static argument of ``jax.jit``); ``norm=True`` is resolved once, when the config
    is built (also by ``_replace``/``replace``), so ``config.norm`` is a norm value or ``None``.

    Attributes:
      input_size, hidden_sizes, output_size: layer widths (``hidden_sizes`` is stored as a tuple).
      activation: ``'relu'`` or ``'sigmoid'``.
      norm: the norm between each hidden Affine and its activation: a norm value (``layers.batch_norm(...)``,
        ``layers.batch_renorm(...)``, ``layers.ghost_batch_norm(...)`` or any ``layers.Norm``) or ``None``;
        ``True`` is shorthand for ``layers.book_batch_norm()`` (the book's BatchNorm) and ``False`` for ``None``.
      dropout_ratio: dropout after each hidden activation (0.0: none).
      dropout_inverted: ``True`` scales kept units by ``1/(1-ratio)`` in training (modern); ``False`` is the
        book's (no scaling in training, times ``1-ratio`` at evaluation).
    """

    __slots__ = ()

    def __new__(cls, *args: Any, **kwargs: Any) -> "MLPConfig":
        self = super().__new__(cls, *args, **kwargs)
        hidden_sizes = self.hidden_sizes
        if not isinstance(hidden_sizes, tuple):
            try:  # a list works too, but jit keys on the config: keep it hashable
                hidden_sizes = tuple(hidden_sizes)
            except TypeError:
                pass  # check() names the field
        return tuple.__new__(cls, (self.input_size, hidden_sizes, self.output_size, self.activation,
                                   _resolve_norm(self.norm), self.dropout_ratio, self.dropout_inverted))

    @classmethod
    def _make(cls, iterable: Any) -> "MLPConfig":
        # NamedTuple's _make (and so _replace) bypasses __new__: route it through the resolution above.
        return cls(*iterable)

    def replace(self, **changes: Any) -> "MLPConfig":
        """A copy with ``changes`` (``norm=True`` is resolved as at construction)."""
        return self._replace(**changes)

    @property
    def sizes(self) -> list[int]:
        """Every layer width, input first: ``[input_size, *hidden_sizes, output_size]``."""
        return [int(self.input_size), *[int(h) for h in self.hidden_sizes], int(self.output_size)]

    def check(self) -> "MLPConfig":
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
        try:
            sizes = self.sizes
        except (TypeError, ValueError):
            raise ValueError(f"layer sizes must be positive integers, got {self.input_size!r}, "
                             f"{self.hidden_sizes!r}, {self.output_size!r}") from None
        if any(s < 1 for s in sizes):
            raise ValueError(f"layer sizes must be positive, got {sizes}")
        if not 0.0 <= self.dropout_ratio < 1.0:
            raise ValueError(f"dropout_ratio must be in [0, 1), got {self.dropout_ratio}")
        return self


class MLPParams(NamedTuple):
    """Trainable parameters.

    Attributes:
      affine: one ``AffineParams`` per layer, hidden layers first, the output layer last.
      batch_norm: one parameter pytree of the norm (``BatchNormParams``, ...) per hidden layer, or ``()``
        without a norm.
    """

    affine: tuple
    batch_norm: tuple


class MLPState(NamedTuple):
    """Non-trained state: the norm's state (``BatchNormState``, ...) per hidden layer (empty without a norm)."""

    batch_norm: tuple


def init(
    config: MLPConfig,
    key: Array,
    *,
    weight_init: Any = "he",
    weight_scale: float | Array = 1.0,
    dtype: Any = jnp.float32,
) -> tuple[MLPParams, MLPState]:
    """Initialise the network: ``W = std * normal``, ``b = 0``, the norm's own initial parameters and state.

    Each layer's std is ``policy(weight_init, fan_in) * weight_scale``:

    - ``weight_init=None``: ``weight_scale`` itself for every layer (the book's weight-scale experiment);
    - a number or scalar array: ``weight_scale * weight_init`` for every layer;
    - ``'he'``/``'relu'`` (``sqrt(2 / fan_in)``) or ``'xavier'``/``'sigmoid'`` (``sqrt(1 / fan_in)``), the
      weights then multiplied by ``weight_scale``.

    Args:
      config: the network's structure.
      key: ``jax.random`` key.
      weight_init: the per-layer policy (above).
      weight_scale: a factor on it; may be a traced scalar (vmap over scales).
      dtype: parameter dtype.

    Returns:
      ``(params, state)``.

    Raises:
      TypeError: if ``config`` is not an ``MLPConfig`` (the key comes second).
      ValueError: if ``config`` cannot build a network, ``weight_init`` is an unknown name, or the std or
        ``weight_scale`` is not a scalar.
    """
    if not isinstance(config, MLPConfig):
        raise TypeError(f"model.init(config, key, ...): config comes first and must be an MLPConfig, got "
                        f"{type(config).__name__}")
    config.check()
    sizes = config.sizes
    scale = jnp.asarray(weight_scale, dtype)
    if scale.ndim != 0:
        raise ValueError(f"weight_scale must be a scalar per model (vmap for several), got shape {scale.shape}")
    # One normal draw for all weights, sliced afterwards: under vmap one draw per layer compiles ~20x slower
    # (and would change every number), which is why this does not call layers.affine_init per layer; the
    # per-layer policy is layers.resolve_init_std's, shared with it. The float operations of each case are
    # those the grid engine has always used (the experiments' numbers depend on them, bit for bit).
    shapes = list(zip(sizes[:-1], sizes[1:]))
    noise = jax.random.normal(key, (sum(i * o for i, o in shapes),), dtype)
    affine, offset = [], 0
    for num_in, num_out in shapes:
        if weight_init is None:
            std = scale
        elif isinstance(weight_init, str):
            std = jnp.asarray(layers.resolve_init_std(weight_init, num_in), dtype)
        else:
            std = scale * jnp.asarray(layers.resolve_init_std(weight_init, num_in), dtype)
        if std.ndim != 0:
            raise ValueError(f"weight_init must be a scalar per model (vmap for several), got shape {std.shape}")
        W = std * noise[offset : offset + num_in * num_out].reshape(num_in, num_out)
        if isinstance(weight_init, str):  # the named policy's weights, times the scale
            W = W * scale
        affine.append(layers.AffineParams(W=W, b=jnp.zeros((num_out,), dtype)))
        offset += num_in * num_out
    norm_params, norm_state = [], []
    if config.norm is not None:
        for size in sizes[1:-1]:
            p, s = config.norm.init(size, dtype=dtype)
            norm_params.append(p)
            norm_state.append(s)
    return MLPParams(tuple(affine), tuple(norm_params)), MLPState(tuple(norm_state))


def apply(
    config: MLPConfig,
    params: MLPParams,
    state: MLPState,
    x: Array,
    *,
    train: bool,
    key: Array | None = None,
    norm_kwargs: dict | None = None,
) -> tuple[Array, MLPState]:
    """Scores of the network.

    Args:
      config: the structure ``params`` were made with.
      params, state: from ``init``.
      x: ``[N, input_size]``.
      train: the book's ``train_flg``: batch statistics + running update + dropout (True), or running
        statistics, no update, no dropout (False).
      key: ``jax.random`` key, needed only for dropout at training time.
      norm_kwargs: extra keyword arguments of every norm's ``apply`` (e.g. ``{"momentum": m}`` with a traced
        ``m``: the grid engine's batch-norm momentum axis); ``None`` for none.

    Returns:
      ``(logits [N, output_size], new_state)``.

    Raises:
      ValueError: if ``x`` is not ``[N, features]`` or ``config``, ``params`` and ``state`` disagree on the norm;
        dropout at training time without a key.
    """
    logits, new_state, _ = _forward(config, params, state, x, train, key, norm_kwargs)
    return logits, new_state


def hidden(
    config: MLPConfig, params: MLPParams, state: MLPState, x: Array, *, train: bool, key: Array | None = None
) -> list[tuple[Array, Array]]:
    """Each hidden layer's pre-activation (after the norm, when used) and activation, for looking inside.

    With ``train=True`` the norm uses the statistics of ``x`` itself (the book's ch. 6.2 histograms of a
    freshly initialised network need exactly that); the running statistics are not returned.

    Args:
      config, params, state, x, train, key: as ``apply``.

    Returns:
      one ``(pre_activation [N, H], activation [N, H])`` pair per hidden layer, first layer first; the
      activation is taken before dropout.

    Raises:
      ValueError: as ``apply``.
    """
    return _forward(config, params, state, x, train, key)[2]


def _forward(config, params, state, x, train, key, norm_kwargs=None):
    if x.ndim != 2:
        raise ValueError(f"model.apply: x must be [N, features], got shape {x.shape}")
    norm = config.norm
    num_bn = len(config.hidden_sizes) if norm is not None else 0
    if len(params.batch_norm) != num_bn or len(state.batch_norm) != num_bn:
        raise ValueError("model.apply: config, params and state disagree on batch norm (use the pair init returned "
                         "with the same config)")
    act = ACTIVATIONS[config.activation]
    hidden_layers = params.affine[:-1]
    dropout = config.dropout_ratio > 0.0
    keys = (jax.random.split(key, len(hidden_layers)) if (train and dropout and key is not None)
            else [None] * len(hidden_layers))
    new_bn, inside = [], []
    h = x
    for i, aff in enumerate(hidden_layers):
        h = layers.affine_apply(aff, h)
        if norm is not None:
            h, s = norm.apply(params.batch_norm[i], state.batch_norm[i], h, train=train, **(norm_kwargs or {}))
            new_bn.append(s)
        pre = h
        h = act(h)
        inside.append((pre, h))
        if dropout:
            h = layers.dropout_apply(h, keys[i], config.dropout_ratio, train=train, inverted=config.dropout_inverted)
    logits = layers.affine_apply(params.affine[-1], h)
    return logits, MLPState(batch_norm=tuple(new_bn)), inside


def loss(
    config: MLPConfig,
    params: MLPParams,
    state: MLPState,
    x: Array,
    labels: Array,
    *,
    train: bool,
    key: Array | None = None,
    weight_decay: float | Array = 0.0,
    norm_kwargs: dict | None = None,
) -> tuple[Array, MLPState]:
    """Softmax cross-entropy plus ``weight_decay / 2 * sum(W ** 2)`` over every Affine weight (the book's).

    Use ``jax.value_and_grad(loss, argnums=1, has_aux=True)``.

    Args:
      config, params, state, x, train, key, norm_kwargs: as ``apply``.
      labels: ``[N]`` integer classes.
      weight_decay: the L2 coefficient (the book's ``weight_decay_lambda``); may be traced.

    Returns:
      ``(loss, new_state)``: the scalar loss and the state ``apply`` returns.

    Raises:
      ValueError: as ``apply``.
    """
    logits, new_state = apply(config, params, state, x, train=train, key=key, norm_kwargs=norm_kwargs)
    value = layers.softmax_cross_entropy(logits, labels)
    decay = sum(jnp.sum(jnp.square(a.W)) for a in params.affine)
    return value + 0.5 * weight_decay * decay, new_state


def predict(config: MLPConfig, params: MLPParams, state: MLPState, x: Array) -> Array:
    """Predicted classes in evaluation mode (running statistics, no update, no dropout).

    Args:
      config, params, state, x: as ``apply``.

    Returns:
      ``[N]`` classes; a row with a NaN score counts as the first NaN's class (class 0 for an all-NaN row), as
      NumPy's argmax does in the book.

    Raises:
      ValueError: as ``apply``.
    """
    logits, _ = apply(config, params, state, x, train=False)
    return jnp.argmax(logits, axis=-1)


def accuracy(config: MLPConfig, params: MLPParams, state: MLPState, x: Array, labels: Array) -> Array:
    """Share of ``x`` classified as ``labels``, in evaluation mode (running statistics, no update).

    Args:
      config, params, state, x: as ``apply``.
      labels: ``[N]`` integer classes.

    Returns:
      a float32 scalar in [0, 1].

    Raises:
      ValueError: as ``apply``.
    """
    return jnp.mean((predict(config, params, state, x) == labels).astype(jnp.float32))


def recalibrate(
    config: MLPConfig, params: MLPParams, state: MLPState, batches: Any, *, key: Array | None = None
) -> MLPState:
    """Precise statistics: every norm layer's running mean and variance set to the equal-weight average of its
    batch statistics over ``batches`` (``norms.recalibrate`` on this network).

    The network runs in training mode (each layer normalised as in training, so layer ``l`` sees the inputs
    training gives it) without taking gradients; the parameters are unchanged. For an array, one jitted pass over
    the batches, so memory does not grow with their number; any other iterable of batches (a list, a generator,
    a data loader) is read one batch at a time. Use it after weight averaging (SWA/EMA), pruning or other
    surgery, or to replace running averages that lag behind training (stale NaN/inf statistics included).

    Args:
      config, params, state: the network.
      batches: ``[num_batches, N, input_size]``, or an iterable of ``[N, input_size]`` batches (sizes may differ).
      key: a ``jax.random`` key when the network has dropout (the training-mode forward drops units).

    Returns:
      the new ``MLPState`` (other state fields, e.g. Batch Renorm's update count, are kept); ``state`` itself
      for a network without a norm.

    Raises:
      ValueError: a norm without running statistics (``layers.group_norm``, ``layers.layer_norm``: nothing to
        recalibrate); if ``batches`` is not ``[num_batches >= 1, N, input_size]`` (an iterable: empty, or a batch
        not ``[N >= 1, input_size]``), the network has dropout and no key is given, or ``config``, ``params`` and
        ``state`` disagree.
      TypeError: ``batches`` neither an array nor an iterable of batches.
    """
    config.check()
    if config.norm is not None and not config.norm.has_running_stats:
        raise ValueError(f"recalibrate: the network's norm {type(config.norm).__name__} has no running statistics "
                         "to recalibrate: it normalises each example by its own statistics in training and "
                         "evaluation alike")
    if isinstance(batches, (jax.Array, np.ndarray)) or hasattr(batches, "__array__"):
        batches = jnp.asarray(batches)
        if batches.ndim != 3 or batches.shape[0] < 1 or batches.shape[1] < 1 or batches.shape[-1] != config.input_size:
            raise ValueError(f"recalibrate: batches must be [num_batches >= 1, N >= 1, {config.input_size}], got "
                             f"shape {batches.shape}")
        first = batches[0]
    else:
        if isinstance(batches, (str, bytes, dict)) or not hasattr(batches, "__iter__"):
            raise TypeError(f"recalibrate: batches must be an array [num_batches, N, {config.input_size}] or an "
                            f"iterable of [N, {config.input_size}] batches, got {type(batches).__name__}")
        batches = _checked_batches(iter(batches), config.input_size)
        first = next(batches, None)
        if first is None:
            raise ValueError("recalibrate: batches is empty; give at least one batch")
        batches = itertools.chain([first], batches)
    if config.dropout_ratio > 0 and key is None:
        raise ValueError("recalibrate: the network has dropout; pass a jax.random key")
    if config.norm is None:
        for _ in batches:  # each batch still checked
            pass
        return state
    _forward(config, params, state, first, False, None)  # structure and shapes, before compiling
    # norms.recalibrate jits on the partial's function and (hashable) config: one compilation per network.
    return norms.recalibrate(functools.partial(apply, config), params, state, batches, key=key)


def _checked_batches(batches: Any, input_size: int) -> Any:
    """The batches of an iterable as arrays, each checked to be ``[N >= 1, input_size]`` as it comes."""
    for i, xb in enumerate(batches):
        try:
            xb = jnp.asarray(xb)
        except (TypeError, ValueError) as err:
            raise TypeError(f"recalibrate: batch {i} must be an array [N, {input_size}], got "
                            f"{type(xb).__name__}") from err
        if xb.ndim != 2 or xb.shape[0] < 1 or xb.shape[1] != input_size:
            raise ValueError(f"recalibrate: batch {i} must be [N >= 1, {input_size}], got shape {xb.shape}")
        yield xb


def fold(config: MLPConfig, params: MLPParams, state: MLPState) -> tuple[MLPConfig, MLPParams, MLPState]:
    """The same network in evaluation mode without norm layers: each norm folded into the Affine before it.

    Training the folded network is training a network without a norm.

    Args:
      config, params, state: the network.

    Returns:
      ``(config without a norm, params, empty state)`` whose ``apply(..., train=False)`` gives the evaluation
      outputs of the original (to float rounding; see ``layers.fold_batch_norm``).

    Raises:
      ValueError: a norm without running statistics (``layers.group_norm``, ``layers.layer_norm``), or
        ``config``, ``params`` and ``state`` that disagree (checked before folding).
    """
    config.check()
    norm = config.norm
    if norm is not None and not norm.has_running_stats:
        raise ValueError(f"fold: the network's norm {type(norm).__name__} has no running statistics to fold: it "
                         "normalises each example by its own statistics at evaluation too, so no fixed scale and "
                         "shift exist; keep the norm layers")
    plain = config._replace(norm=None)
    # Structure and shapes: a config that disagrees with params and state fails here, not after folding.
    _forward(config, params, state, jnp.zeros((1, config.input_size), params.affine[0].W.dtype), False, None)
    if norm is None:
        return plain, params, MLPState(())
    affine = tuple(layers.fold_batch_norm(a, norm, p, s)
                   for a, p, s in zip(params.affine[:-1], params.batch_norm, state.batch_norm))
    return plain, MLPParams(affine + (params.affine[-1],), ()), MLPState(())


def num_flops(sizes: Any, batch_size: int, *, backward: bool = False) -> int:
    """Multiply-add FLOPs (2 per MAC) of the Affine layers for one batch, ignoring elementwise work.

    Args:
      sizes: every layer width, input first (``MLPConfig.sizes``).
      batch_size: rows per batch.
      backward: add the weight gradients of every layer and the input gradients of all but the first layer
        (the input itself needs no gradient).

    Returns:
      the FLOP count.
    """
    macs = [a * b for a, b in zip(sizes[:-1], sizes[1:])]
    fwd = 2 * batch_size * sum(macs)
    if not backward:
        return fwd
    return fwd + 2 * batch_size * sum(macs) + 2 * batch_size * sum(macs[1:])
