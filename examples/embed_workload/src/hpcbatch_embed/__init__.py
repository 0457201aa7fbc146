"""An hpcbatch workload outside hpcbatch: embed arrays from zarr with a small torch model.

``hpcbatch run embed --input arrays.zarr --output embeddings.zarr`` reads an array of
shape ``(n, length, features)``, runs each ``(length, features)`` array through a small
1-D convolutional encoder and writes an ``(n, dim)`` array of embeddings.  See
``docs/framework.md`` in hpcbatch for the walk-through.
"""

__all__ = ["Embedder", "make_inputs"]


def __getattr__(name: str):
    # torch only when the model is used: `hpcbatch --help` and `hpcbatch plan` load every
    # installed workload, and should not wait for torch
    if name in __all__:
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
