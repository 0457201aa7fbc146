"""The model: a small 1-D convolutional encoder, its weights fixed by a seed."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

HIDDEN = 64


class Embedder(nn.Module):
    """``(length, features)`` -> ``(dim,)``: two convolutions, mean over time, a projection."""

    def __init__(self, features: int, dim: int, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)  # the same weights in every process
        self.conv1 = nn.Conv1d(features, HIDDEN, kernel_size=5, padding=2)
        self.conv2 = nn.Conv1d(HIDDEN, HIDDEN, kernel_size=5, padding=2)
        self.proj = nn.Linear(HIDDEN, dim)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, length, features)
        h = torch.relu(self.conv1(x.transpose(1, 2)))
        h = torch.relu(self.conv2(h))
        return self.proj(h.mean(dim=2))

    @torch.no_grad()
    def embed(self, arrays: np.ndarray) -> np.ndarray:
        """One array at a time: the same bits whatever chunk an array arrives in."""
        out = np.empty((len(arrays), self.proj.out_features), dtype=np.float32)
        for k, array in enumerate(arrays):
            x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
            out[k] = self(x)[0].numpy()
        return out


def make_inputs(path: str, n: int, length: int = 128, features: int = 16, seed: int = 0) -> str:
    """Write ``n`` random ``(length, features)`` float32 arrays to the zarr array ``path``."""
    import zarr

    rng = np.random.default_rng(seed)
    array = zarr.create_array(store=str(path), shape=(n, length, features), dtype="float32",
                              chunks=(256, length, features), overwrite=True)  # fmt: skip
    for start in range(0, n, 256):
        stop = min(n, start + 256)
        array[start:stop] = rng.normal(size=(stop - start, length, features)).astype("float32")
    return str(path)
