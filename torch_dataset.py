"""A ``torch.utils.data.IterableDataset`` of a run's shuffled activation batches (store/ stays torch-free)::

    from torch.utils.data import DataLoader
    from qcache import store
    from qcache.torch_dataset import ActivationBatches

    run = store.open("qcache-store").run("boolq/smollm2-135m/nf4")
    data = ActivationBatches(run, 15, batch_tokens=4096, seed=0)
    for epoch in range(3):
        data.set_epoch(epoch)
        for x in DataLoader(data, batch_size=None, num_workers=2):  # x: (4096, 1536) float16 tensor
            ...

Each DataLoader worker (and each distributed rank) is one part of ``store.batches``: the epoch's permuted
unit list is split round robin over ``world_size * num_workers`` parts, so together they yield every
committed token exactly once per epoch and no token twice. The dataset already batches: pass
``batch_size=None`` to the DataLoader.

The epoch lives in shared memory (a ``torch.multiprocessing`` value), not in each worker's copy of the
dataset, so ``set_epoch`` also reaches workers kept alive by ``persistent_workers=True``: each worker reads
it when its iteration of an epoch starts.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .store.batches import BatchPlan, plan_batches
from .store.errors import InvalidOption
from .store.reader import Run


class ActivationBatches(IterableDataset[torch.Tensor]):
    """Yields ``(batch_tokens, neurons)`` tensors of a run's layer, in the stored dtype (float16 or float32).

    The arguments are those of ``Run.batches``, checked here (``InvalidName``, ``InvalidOption``,
    ``IncompleteRun``), plus ``rank`` and ``world_size`` for distributed training: by default they are read
    from ``torch.distributed`` when it is initialized, else 0 and 1. Parts differ by at most one unit of
    rows, so ranks may get a batch or two more or fewer: stop every rank at the smallest count where DDP
    needs equal steps. Every worker ends with its own short batch, or drops it with ``drop_last``;
    with ``shuffle=False`` each worker's units are in store order, and the DataLoader interleaves workers.
    """

    def __init__(
        self,
        run: Run,
        layer: int,
        tap: str = "act",
        *,
        batch_tokens: int = 4096,
        shuffle: bool = True,
        seed: int = 0,
        buffer_tokens: int | None = None,
        drop_last: bool = False,
        allow_partial: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        self.plan: BatchPlan = plan_batches(
            run,
            layer,
            tap,
            batch_tokens=batch_tokens,
            shuffle=shuffle,
            seed=seed,
            buffer_tokens=buffer_tokens,
            drop_last=drop_last,
            allow_partial=allow_partial,
        )
        if (rank is None) != (world_size is None):
            raise InvalidOption(
                f"pass both rank and world_size or neither (got rank={rank!r}, world_size={world_size!r})"
            )
        if rank is not None and world_size is not None:
            _check_rank(rank, world_size)
        self.rank, self.world_size = rank, world_size
        # shared with the DataLoader's workers (inherited or passed when they start), so that persistent
        # workers see set_epoch too; a plain attribute would stay frozen in each worker's copy
        self._epoch = torch.multiprocessing.Value("q", 0, lock=False)

    @property
    def epoch(self) -> int:
        """The epoch the next iteration uses (``set_epoch``)."""
        return int(self._epoch.value)

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch``'s order from the next iteration on (as ``DistributedSampler.set_epoch``); call it
        before creating the epoch's DataLoader iterator, with or without persistent workers."""
        self.plan.unit_order(epoch)  # checks it
        self._epoch.value = int(epoch)

    def _rank_world(self) -> tuple[int, int]:
        if self.rank is not None and self.world_size is not None:
            return self.rank, self.world_size
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rank, world = self._rank_world()
        part, n_parts = rank * n_workers + worker, world * n_workers
        for batch in self.plan.batches(self.epoch, part, n_parts):
            yield torch.from_numpy(batch)


def _check_rank(rank: object, world_size: object) -> None:
    """``InvalidOption`` unless ``0 <= rank < world_size`` are ints, named as the caller passed them."""
    for name, value, least in (("world_size", world_size, 1), ("rank", rank, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise InvalidOption(f"{name} must be an int >= {least}, got {value!r}")
    if rank >= world_size:  # type: ignore[operator]
        raise InvalidOption(
            f"rank must be in [0, world_size={world_size!r}), got rank={rank!r}: ranks count from 0"
        )
