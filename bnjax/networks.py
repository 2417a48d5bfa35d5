"""The kinds of network the library trains, and the one place that tells them apart.

Each kind is a module of pure functions with the same signatures (``init``, ``apply``, ``loss``, ``predict``,
``accuracy``, ``fold``), keyed by the type of its static configuration:

* ``"mlp"``: ``bnjax.model`` with a ``model.MLPConfig`` (the book's ch. 6 ``MultiLayerNetExtend``);
* ``"convnet"``: ``bnjax.convnet`` with a ``convnet.ConvNetConfig`` (the book's ch. 7 ``SimpleConvNet``).

``bnjax.train`` and the grid engine call ``module_for(config)`` and never name a kind themselves, so a new kind
is one module and one entry in ``KINDS``.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

from bnjax import convnet, model, options

__all__ = ["KINDS", "module_for", "kind_of", "num_flops", "activation_floats", "network_config"]

# kind name -> (configuration type, module); the names are ``bnjax.options.MODELS`` (a test keeps them equal).
KINDS: dict[str, tuple[type, ModuleType]] = {
    "mlp": (model.MLPConfig, model),
    "convnet": (convnet.ConvNetConfig, convnet),
}


def kind_of(config: Any) -> str:
    """The kind name of a network configuration.

    Args:
      config: an ``MLPConfig`` or a ``ConvNetConfig``.

    Returns:
      its name in ``KINDS``.

    Raises:
      TypeError: for anything else.
    """
    for name, (config_type, _) in KINDS.items():
        if isinstance(config, config_type):
            return name
    raise TypeError(f"expected a network configuration ({', '.join(t.__name__ for t, _ in KINDS.values())}), "
                    f"got {type(config).__name__}")


def module_for(config: Any) -> ModuleType:
    """The module whose functions run a network of this configuration.

    Args:
      config: an ``MLPConfig`` or a ``ConvNetConfig``.

    Returns:
      ``bnjax.model`` or ``bnjax.convnet``.

    Raises:
      TypeError: for anything else.
    """
    return KINDS[kind_of(config)][1]


def num_flops(config: Any, batch_size: int, *, backward: bool = False) -> int:
    """Multiply-add FLOPs (2 per MAC) of one batch through the network's weighted layers.

    Args:
      config: the network.
      batch_size: rows per batch.
      backward: include the gradients (see ``model.num_flops``).

    Returns:
      the FLOP count.
    """
    if isinstance(config, model.MLPConfig):
        return model.num_flops(config.sizes, batch_size, backward=backward)
    return module_for(config).num_flops(config, batch_size, backward=backward)


def activation_floats(config: Any, batch_size: int) -> int:
    """A generous count of the floats one training step of one model keeps alive (for memory planning).

    Args:
      config: the network.
      batch_size: rows per batch.

    Returns:
      the count.
    """
    if isinstance(config, model.MLPConfig):
        return 6 * batch_size * sum(config.sizes[1:])
    return module_for(config).activation_floats(config, batch_size)


def network_config(kind: str, *, input_size: int, hidden_sizes: tuple[int, ...], output_size: int, **fields: Any):
    """The configuration of a network of kind ``kind`` for ``input_size``-feature rows.

    Args:
      kind: a name of ``KINDS``.
      input_size: features per row; the conv net reads a row as a square one-channel image.
      hidden_sizes: the hidden Affine widths (the conv net's come after its convolution and pooling).
      output_size: classes.
      **fields: the arm's fields (``activation``, ``norm``, ``dropout_ratio``, ``dropout_inverted``).

    Returns:
      the ``MLPConfig`` or ``ConvNetConfig``.

    Raises:
      ValueError: an unknown kind, or an input the kind cannot read.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown model {kind!r}; choose one of {', '.join(options.MODELS)}")
    if kind == "mlp":
        return model.MLPConfig(input_size=int(input_size), hidden_sizes=tuple(hidden_sizes),
                               output_size=int(output_size), **fields)
    side = math.isqrt(int(input_size))
    if side * side != int(input_size):
        raise ValueError(f"model 'convnet' reads each row as a square one-channel image; {input_size} features "
                         "are not a square")
    return convnet.ConvNetConfig(input_shape=(side, side, 1), hidden_sizes=tuple(hidden_sizes),
                                 output_size=int(output_size), **fields)
