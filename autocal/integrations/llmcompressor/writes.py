"""Writing a batch's quantized weights back while the next batch is quantized.

LLM Compressor writes each quantized weight and its qparams back with compressed-tensors'
``update_offload_parameter``: into the module's offloaded CPU copy (a device-to-host copy into pageable memory,
which holds the host until it ends) and into its onloaded copy. At DeepSeek-V3's layer shape that is 22 GB per
layer, about a third of a group's compression time on an H100, with the GPU idle. ``BackgroundWrites`` makes the
writes on a worker thread (on a GPU, on a side CUDA stream that first waits for the batch to be computed), so
they overlap the next batch's arithmetic.

At most one write is outstanding: ``submit`` first waits for the one before, so the memory held is one batch's
result more. Leaving the context waits for the last write and raises any write's error; callers leave it before
anything reads the written weights, and before leaving compressed-tensors' ``disable_offloading`` (which drops
the onloaded copies the writes update).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType

import torch

__all__ = ["BackgroundWrites"]


class BackgroundWrites:
    """A context that runs writes one at a time, in order, on one worker thread."""

    def __init__(self) -> None:
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="autocal-writes")
        self._pending: Future | None = None

    def submit(self, write: Callable[[], None], device: torch.device) -> None:
        """Run ``write`` once the previous write has ended and, on a GPU, once ``device``'s current stream has
        computed what was queued on it so far (the tensors ``write`` reads)."""
        self._wait()
        ready = None
        if device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(device))
        self._pending = self._worker.submit(_write, write, ready, device)

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()  # a write's error, raised in the caller's thread

    def __enter__(self) -> BackgroundWrites:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        try:
            self._wait()
        finally:
            self._worker.shutdown(wait=True)


@torch.no_grad()  # grad mode is per thread: the caller's ``no_grad`` does not reach this one
def _write(write: Callable[[], None], ready: torch.cuda.Event | None, device: torch.device) -> None:
    if ready is None:
        write()
        return
    with torch.cuda.device(device):
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            stream.wait_event(ready)
            write()
        stream.synchronize()  # the writes are done before their tensors can be freed or the weights read
