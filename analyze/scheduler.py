"""Where Dask graphs run: a local threaded scheduler by default, or a ``distributed`` cluster."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import dask
from dask.delayed import Delayed

from qcache.store.errors import InvalidOption

_UNITS = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_memory(text: str | None) -> int | None:
    """``"4GB"``, ``"512MiB"``, ``"2g"`` or bytes -> bytes; None stays None.

    >>> parse_memory("2GiB")
    2147483648
    """
    if text is None:
        return None
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        if t and t[-1] in _UNITS:
            return int(float(t[:-1]) * _UNITS[t[-1]])
        return int(float(t))
    except ValueError:
        raise InvalidOption(f"--memory-limit {text!r} is not a size like 4GB or 512MiB") from None


@contextlib.contextmanager
def scheduler(address: str | None = None, *, memory_limit: int | None = None) -> Iterator[dict[str, Any]]:
    """Configure Dask for the block: ``None``/``threads`` (local threads, one per core), ``sync``,
    ``local-cluster`` (a ``distributed.LocalCluster`` of processes) or ``tcp://host:port``.

    Yields a small description recorded with the results.
    """
    if address in (None, "threads"):
        workers = os.cpu_count() or 1
        with dask.config.set(scheduler="threads", num_workers=workers):
            yield {"scheduler": "threads", "workers": workers, "memory_limit": memory_limit}
        return
    if address == "sync":
        with dask.config.set(scheduler="sync"):
            yield {"scheduler": "sync", "workers": 1, "memory_limit": memory_limit}
        return
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise InvalidOption(
            f"--scheduler {address} needs the `distributed` package: pip install distributed"
        ) from exc
    if address == "local-cluster":
        kwargs = {"memory_limit": memory_limit} if memory_limit else {}
        with (
            LocalCluster(
                n_workers=os.cpu_count() or 1,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                **kwargs,
            ) as cluster,
            Client(cluster) as client,
        ):
            yield {"scheduler": "local-cluster", "workers": len(client.scheduler_info()["workers"])}
        return
    if not address.startswith(("tcp://", "tls://", "inproc://")):
        raise InvalidOption(f"--scheduler {address!r}: use threads, sync, local-cluster or tcp://HOST:PORT")
    try:
        client = Client(address, timeout="10s")
    except OSError as exc:
        raise InvalidOption(f"cannot reach the Dask scheduler at {address} ({exc}); is it running?") from exc
    with client:
        yield {"scheduler": address, "workers": len(client.scheduler_info()["workers"])}


def pairwise_reduce(parts: list[Delayed], combine: Callable[[Any, Any], Any], fan_in: int = 2) -> Delayed:
    """Combine delayed partials in a balanced tree of tasks, each folding up to ``fan_in`` of them
    pairwise: few partials alive at once, and the combination order (hence rounding) does not grow with
    the number of parts. A wider ``fan_in`` means fewer, larger tasks. ``parts`` must not be empty."""
    fold = partial(_fold_pairwise, combine)
    while len(parts) > 1:
        groups = [parts[k : k + fan_in] for k in range(0, len(parts), fan_in)]
        parts = [dask.delayed(fold)(*g) if len(g) > 1 else g[0] for g in groups]
    return parts[0]


def _fold_pairwise(combine: Callable[[Any, Any], Any], *values: Any) -> Any:
    vals = list(values)
    while len(vals) > 1:
        vals = [
            combine(vals[k], vals[k + 1]) if k + 1 < len(vals) else vals[k] for k in range(0, len(vals), 2)
        ]
    return vals[0]
