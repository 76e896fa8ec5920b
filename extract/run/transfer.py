"""Host <-> device copies that do not make the GPU wait on the CPU.

A blocking ``.to(device)`` from pageable memory or ``.to("cpu")`` waits for every kernel queued before it,
so the extraction loop used to drain the GPU several times per batch. On CUDA, inputs go up from pinned
memory with ``non_blocking=True``, and results come down on a side stream into pinned buffers, behind an
event recorded after the kernels that produce them; the caller reads them (``Fetch.result``) after
queueing the next batch. Pinned buffers come from PyTorch's caching host allocator, so after the first
batches they are reused, not allocated. On a CPU every call is the plain synchronous copy it was before
(same tensors, same bits).
"""

from __future__ import annotations

import numpy as np
import torch


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """``array`` as a tensor on ``device``: a view on CPU; on CUDA an asynchronous copy from pinned memory."""
    t = torch.from_numpy(array)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def real_token_index(lengths: np.ndarray, seq: int) -> np.ndarray:
    """``(sum(lengths),)`` int64 rows of a ``(batch * seq)`` flattening that hold real tokens, example
    after example (right padding: example ``b``'s tokens are positions ``0 .. lengths[b] - 1``).

    Built on the host from lengths the host knows, so selecting real tokens on the GPU needs no
    device-to-host read of a mask (a boolean-mask select must learn its output size first).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    starts = np.arange(len(lengths), dtype=np.int64) * seq
    offsets = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(starts, lengths) + offsets


class Fetch:
    """Device tensors on their way to host numpy arrays; ``result()`` waits for them alone.

    On CUDA the copies run on ``stream`` (a side stream) after an event recorded on the current stream,
    into pinned host buffers; ``record_stream`` keeps the caching allocator from reusing the sources
    before the copies end. On a CPU the arrays are ready at once.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], stream: torch.cuda.Stream | None = None) -> None:
        self._done: torch.cuda.Event | None = None
        if stream is None or not tensors or next(iter(tensors.values())).device.type != "cuda":
            self._host = {k: v.to("cpu") for k, v in tensors.items()}
            return
        ready = torch.cuda.Event()
        ready.record()  # on the current (compute) stream, after the kernels that made ``tensors``
        self._host = {}
        with torch.cuda.stream(stream):
            stream.wait_event(ready)
            for k, v in tensors.items():
                buf = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
                buf.copy_(v, non_blocking=True)
                v.record_stream(stream)
                self._host[k] = buf
            self._done = torch.cuda.Event()
            self._done.record(stream)

    def result(self) -> dict[str, np.ndarray]:
        """The host arrays, once their copies have ended (waits for those copies only)."""
        if self._done is not None:
            self._done.synchronize()
        return {k: v.numpy() for k, v in self._host.items()}


def side_stream(device: torch.device) -> torch.cuda.Stream | None:
    """A stream for device-to-host copies on CUDA; ``None`` (copy in place) elsewhere."""
    return torch.cuda.Stream(device) if device.type == "cuda" else None
