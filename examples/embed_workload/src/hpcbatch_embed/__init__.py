"""An hpcbatch workload outside hpcbatch: embed arrays from zarr with a small torch model.

``hpcbatch run embed --input arrays.zarr --output embeddings.zarr`` reads an array of
shape ``(n, length, features)``, runs each ``(length, features)`` array through a small
1-D convolutional encoder and writes an ``(n, dim)`` array of embeddings.  See
``docs/framework.md`` in hpcbatch for the walk-through.
"""

from .model import Embedder, make_inputs

__all__ = ["Embedder", "make_inputs"]
