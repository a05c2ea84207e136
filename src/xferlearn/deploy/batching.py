"""Batching for the service: many request threads, one model, few forward passes.

A request thread queues its decoded array and then competes for the model's lock; whoever
gets it runs everything queued (up to MAX_BATCH) as one batch and hands each waiter its row.
So a burst of requests costs a few batched passes, and nobody waits for a timer to fill a
batch. It works with any engine: PyTorch, or ONNX Runtime fp32 or int8 (deploy/predict.py).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future

import numpy as np
import torch

from ..models.predictor import BasePredictor

# A larger batch makes the first waiters of a burst wait for the last. Capping it at 8, `predict`'s
# batch on a CPU, moved nothing beyond noise at 16 clients (47.4 and 48.0 requests/s against 46.5
# and 46.8, p99 466-482 ms against 480-487; benchmarks/RESULTS.md, session 19), so it stays at 32.
MAX_BATCH = 32


class BatchingRunner:
    """Runs the model for many threads: whoever gets the lock runs everything queued as one batch.
    Any engine's predictor (`BasePredictor.probabilities` on an (N, 3, H, W) uint8 batch) will do."""

    def __init__(self, predictor: BasePredictor, lock: threading.Lock):
        self.predictor, self.lock = predictor, lock
        self._queue: list[tuple[np.ndarray, Future]] = []
        self._queue_lock = threading.Lock()

    def probabilities(self, array: np.ndarray) -> np.ndarray:
        mine: Future = Future()
        with self._queue_lock:
            self._queue.append((array, mine))
        while not mine.done():
            with self.lock:
                with self._queue_lock:
                    batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                if not batch:
                    continue
                try:
                    stacked = torch.from_numpy(np.stack([a for a, _ in batch])).permute(0, 3, 1, 2)
                    for (_, future), probs in zip(batch, self.predictor.probabilities(stacked)):
                        future.set_result(probs)
                except BaseException as error:  # every waiter in the batch hears about it
                    for _, future in batch:
                        future.set_exception(error)
        return mine.result()


