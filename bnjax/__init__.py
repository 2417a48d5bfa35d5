"""bnjax: pure-functional Batch Normalization for JAX.

Modules: ``layers`` (Affine, BatchNorm, activations, dropout, loss), ``model`` (the book's
MultiLayerNetExtend), ``train`` (optax step and the weight-scale sweep), ``data`` (offline MNIST).
"""

__version__ = "0.1.0"
