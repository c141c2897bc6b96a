"""Decoding a stream of image files into batches of model pixels, in worker processes ahead of inference
(``edgedistill embed``, ``classify``, the bench's end-to-end rows): docs/runtime.md#decoding-photos.

- Processes, not threads: Python around PIL (opening files, parsing headers) and numpy hold the GIL, so threads
  share one interpreter; processes do not, and keep the consumer's interpreter free for inference.
- Workers send uint8 crops (H, W, 3), a quarter of the float32 pixels, and the consumer normalises them.
- Start method ``forkserver`` (``spawn`` where there is none): the parent may run onnxruntime or torch threads,
  and a plain fork would copy their locks mid-use. The server starts once per process with this module (numpy,
  PIL) loaded; each call's workers fork from it in about a tenth of a second (spawn: seconds, every call).
- Workers ignore Ctrl-C: the parent gets the KeyboardInterrupt and shuts the pool down, as it does when the
  consumer closes the generator early; workers import nothing heavy (runtime/ is torch-free).
"""

from __future__ import annotations

import math
import multiprocessing
import signal
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Iterator, Sequence

import numpy as np

from edgedistill.core.errors import UserError
from edgedistill.data.images import why_unreadable
from edgedistill.runtime.limits import usable_cpus
from edgedistill.runtime.preprocess import DECODE_MODES, ImageInput, Preprocess, check_decode

__all__ = ["DECODE_MODES", "decoded_batches", "default_workers"]

PART = 16     # images per worker task: small enough to keep every worker busy and to stop quickly
INLINE = 32   # fewer images than this are decoded in this process when ``workers`` is not given (no start cost)

Batch = tuple[list[int], np.ndarray, list[tuple[int, str]]]


def default_workers() -> int:
    """Decode processes: one per usable CPU. Inference shares the cores; the bounded queue settles the split
    (docs/runtime.md#decoding-photos)."""
    return usable_cpus()[0]


def decoded_batches(images: Sequence[ImageInput], preprocess: Preprocess, batch: int, *, decode: str = "reduced",
                    exif: bool = True, workers: int | None = None, ahead: int = 2) -> Iterator[Batch]:
    """(positions, (B, 3, H, W) float32 pixels, [(position, why unreadable)]) per batch of ``images``, in order,
    decoded ``ahead`` batches in advance of the consumer so decoding overlaps inference. Positions index
    ``images``. ``workers``: decode processes (default: ``default_workers()``; 0 decodes in this process, in
    step with the consumer)."""
    check_decode(decode)
    if batch < 1 or ahead < 0 or (workers is not None and workers < 0):
        raise UserError(f"batch ({batch}) must be 1 or more, ahead ({ahead}) and workers ({workers}) 0 or more")
    if workers is None:
        workers = 0 if len(images) < INLINE else default_workers()
    groups = [range(s, min(s + batch, len(images))) for s in range(0, len(images), batch)]
    if workers == 0 or not groups:
        yield from _inline(images, preprocess, groups, decode, exif)
    else:
        yield from _pooled(images, preprocess, groups, decode, exif, workers, ahead)


def _inline(images: Sequence[ImageInput], preprocess: Preprocess, groups: list[range], decode: str,
            exif: bool) -> Iterator[Batch]:
    for group in groups:
        yield _assemble(preprocess, group, [_decode((preprocess, decode, exif), [images[i] for i in group])])


def _pooled(images: Sequence[ImageInput], preprocess: Preprocess, groups: list[range], decode: str, exif: bool,
            workers: int, ahead: int) -> Iterator[Batch]:
    part = max(1, min(PART, math.ceil(len(groups[0]) / workers)))
    pool = ProcessPoolExecutor(max_workers=min(workers, math.ceil(len(images) / part)), mp_context=_context(),
                               initializer=_start_worker, initargs=(preprocess, decode, exif))
    try:
        pending: deque[tuple[range, list[Future]]] = deque()
        todo = iter(groups)

        def submit() -> None:
            group = next(todo, None)
            if group is not None:
                pending.append((group, [pool.submit(_decode_part, [images[i] for i in group[s:s + part]])
                                        for s in range(0, len(group), part)]))

        for _ in range(ahead + 1):
            submit()
        while pending:
            group, futures = pending.popleft()
            submit()  # before waiting: the workers stay busy while this batch is normalised and consumed
            try:
                parts = [f.result() for f in futures]
            except BrokenProcessPool:
                raise UserError("an image decoding process died (killed, or out of memory); run again, with "
                                "fewer decode workers if it recurs") from None
            yield _assemble(preprocess, group, parts)
    finally:
        # generator closed early, KeyboardInterrupt or error: drop the queued tasks, wait for the few running
        pool.shutdown(wait=True, cancel_futures=True)


def _assemble(preprocess: Preprocess, group: range,
              parts: list[tuple[np.ndarray, list[tuple[int, str]]]]) -> Batch:
    """Worker parts (in order) -> one batch: positions in ``images``, float32 pixels, unreadable positions."""
    bad, offset = [], 0
    for crops, failed in parts:
        bad += [(group[offset + k], why) for k, why in failed]
        offset += len(crops) + len(failed)
    failed_at = {i for i, _ in bad}
    crops = np.concatenate([c for c, _ in parts]) if parts else np.zeros((0, *preprocess.config.size, 3), np.uint8)
    return [i for i in group if i not in failed_at], preprocess.normalise(crops), bad


def _context() -> multiprocessing.context.BaseContext:
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    # '__main__' is the default preload: without it each worker would re-import the parent's main script
    ctx.set_forkserver_preload(["__main__", __name__])  # no effect once the server runs
    return ctx


# -- in the worker ------------------------------------------------------------------------------------------------
_JOB: tuple[Preprocess, str, bool] | None = None


def _start_worker(preprocess: Preprocess, decode: str, exif: bool) -> None:
    global _JOB
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops the pool
    _JOB = (preprocess, decode, exif)


def _decode_part(sources: list[ImageInput]) -> tuple[np.ndarray, list[tuple[int, str]]]:
    assert _JOB is not None, "worker not started"
    return _decode(_JOB, sources)


def _decode(job: tuple[Preprocess, str, bool], sources: list[ImageInput]) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Sources -> (uint8 crops (n, H, W, 3) of the readable ones, [(offset in ``sources``, why unreadable)])."""
    preprocess, decode, exif = job
    crops, bad = [], []
    for k, source in enumerate(sources):
        try:
            crops.append(preprocess.read_crop(source, decode, exif))
        except Exception as e:  # noqa: BLE001 - an unreadable image is counted, not fatal
            bad.append((k, why_unreadable(e)))
    return (np.stack(crops) if crops else np.zeros((0, *preprocess.config.size, 3), np.uint8)), bad
