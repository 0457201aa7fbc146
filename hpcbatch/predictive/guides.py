"""Save and load a fitted guide's parameters in a ``weights_only``-safe file.

A fitted autoguide (a ``PyroModule``) keeps its parameters in its ``state_dict``;
a hand-written guide keeps them in Pyro's param store.  Both are saved as a plain
dict of tensors (``torch.save``) and loaded with ``torch.load(weights_only=True)``
(through :func:`hpcbatch.security.load_weights`), so loading a file never runs code.
Constraints are not pickled: the guide re-creates them when it is built.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pyro
import torch

from ..errors import DataError


def save_guide(guide: Callable, path: str | Path) -> Path:
    """Write the guide's parameters (unconstrained tensors) to ``path``."""
    path = Path(path)
    if isinstance(guide, torch.nn.Module):
        state = {k: v.detach().clone() for k, v in guide.state_dict().items()}
    else:
        store = pyro.get_param_store()
        state = {f"param_store/{name}": store._params[name].detach().clone() for name in store}
    torch.save(state, path)
    return path


def build_guide(guide: torch.nn.Module, *model_args, then=None, **model_kwargs):
    """Create an autoguide's parameters by one call, in an empty param store.

    Entries of an earlier guide with the same names (``AutoNormal.locs.x``) in the
    global param store would otherwise clash with new shapes or override new values;
    they are dropped, so the module's own parameters are what Pyro sees afterwards.
    ``then(guide)`` runs inside the empty store (e.g. to load a state dict).
    """
    store = pyro.get_param_store()
    with store.scope():
        with torch.no_grad():
            guide(*model_args, **model_kwargs)
        if then is not None:
            then(guide)
    prefix = f"{getattr(guide, '_pyro_name', '')}."
    for name in [n for n in store if prefix != "." and n.startswith(prefix)]:
        del store[name]
    return guide


def load_guide(guide: Callable, path: str | Path, *model_args, **model_kwargs) -> Callable:
    """Load ``path`` into ``guide``; an autoguide is first built by one call on the args.

    Pass the arguments the guide was fitted with (observed data given, or any array
    of the same shape): an observed site left ``None`` would become a latent of an
    autoguide.  Stale param-store entries under the autoguide's name are dropped.

    For a hand-written guide, run it once before (so its ``pyro.param`` statements
    create the params and their constraints); the saved unconstrained values then
    replace them in the param store.
    """
    from ..security import load_weights

    state = load_weights(path, what="guide parameters", fix="save them with save_guide")
    if isinstance(guide, torch.nn.Module):

        def load(module):
            try:
                module.load_state_dict(state)
            except RuntimeError as exc:
                detail = next(
                    (line.strip() for line in str(exc).splitlines()[1:] if line.strip()), ""
                )
                raise DataError(
                    f"{path} does not match this guide ({detail}): save the guide fitted to "
                    "this model and data, and build it with the fitting arguments "
                    "(observations given)"
                ) from None

        return build_guide(guide, *model_args, then=load, **model_kwargs)
    store = pyro.get_param_store()
    for key, value in state.items():
        name = key.removeprefix("param_store/")
        if name not in store:
            raise DataError(
                f"{path} holds param {name!r} that the guide has not created: run the guide "
                "once before load_guide"
            )
        store._params[name].data.copy_(value)
    return guide
