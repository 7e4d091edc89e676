"""The viewer's wrapper of an engine model: per-thread progress/cancel hooks and a memo of few-shot patch outputs."""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Callable, Optional

import numpy as np

class _EngineModel:
    """Wraps an engine model: per-thread progress/cancel hooks and an LRU memo of few-shot patch outputs.

    The memo makes "label one more case and retrain" quick: the few-shot code walks every case in
    the same tiles each time, so only a new case's tiles reach the network. Keys hash the patch
    bytes, so a changed image or model never hits a stale entry.
    """

    def __init__(self, model, memo_bytes: int = 1 << 30) -> None:
        self.model = model
        self.card = model.card
        self.model_hash = model.model_hash
        self.backend = model.backend
        self.memo_bytes = int(memo_bytes)
        self._memo: "OrderedDict[str, tuple]" = OrderedDict()
        self._memo_size = 0
        self._lock = threading.Lock()
        self._local = threading.local()
        self.calls = 0

    def __getattr__(self, name):  # card shortcuts (spacing, coarse_stride, preset ...) of the engine model
        return getattr(self.__dict__["model"], name)

    def set_hook(self, hook: Optional[Callable[[], None]]) -> None:
        self._local.hook = hook

    def set_memo(self, enabled: bool) -> None:
        """Memoise patch outputs in this thread (few-shot work only; volume embeddings have their own cache)."""
        self._local.memo = bool(enabled)

    def embed_patch(self, x: np.ndarray, want_fine: bool = True):
        hook = getattr(self._local, "hook", None)
        if hook is not None:
            hook()  # counts windows for the progress bar; raises InterruptedError when cancelled
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not getattr(self._local, "memo", False):
            self.calls += 1
            return self.model.embed_patch(x, want_fine=want_fine)
        key = hashlib.sha1(x.tobytes() + str((x.shape, want_fine)).encode()).hexdigest()
        with self._lock:
            hit = self._memo.get(key)
            if hit is not None:
                self._memo.move_to_end(key)
                return hit
        self.calls += 1
        out = self.model.embed_patch(x, want_fine=want_fine)
        size = sum(a.nbytes for a in out if a is not None)
        if size <= self.memo_bytes // 4:
            with self._lock:
                self._memo[key] = out
                self._memo_size += size
                while self._memo_size > self.memo_bytes and self._memo:
                    _, old = self._memo.popitem(last=False)
                    self._memo_size -= sum(a.nbytes for a in old if a is not None)
        return out
