"""bnjax: pure-functional Batch Normalization for JAX, and the book's ch. 6.3 experiments built on it.

Modules:

- ``layers``: Affine, activations, dropout, the softmax cross-entropy loss, and the norms re-exported.
- ``norms``: batch norm and its variants (Batch Renorm, Ghost BN) as values, precise statistics
  (``norms.recalibrate``), folding a norm into the layer before it, PyTorch interop.
- ``model``: the book's ``MultiLayerNetExtend`` as pure functions (``init``, ``apply``, ``loss``, ...).
- ``train``: optax optimizers by name and one pure train step.
- ``grid``: the engine that trains many models at once: arms x vmapped axes x seeds.
- ``data``: MNIST, bundled or from an offline copy.
- ``claims``: the statistics the experiments' verdicts use.
- ``files``: atomic file writes (a reader sees the old file or the whole new one, never half of one).
- ``options``: the names the library accepts, without importing JAX (for instant command-line help).
"""

__version__ = "0.1.0"
