"""Background jobs of the viewer module: one worker thread, with progress, cancel and a main-thread finish step."""
from __future__ import annotations

import concurrent.futures
import threading
import time
from typing import Any, Callable, Optional


class BackgroundJob:
    """A function run in the logic's worker thread, with progress, cancel and a main-thread finish step.

    The worker only touches numpy/engine objects; everything that touches MRML happens before
    submission or in ``finish`` (run by :meth:`JobWorker.finish` on the main thread).
    """

    def __init__(self, description: str) -> None:
        self.description = description
        self.progress = 0.0
        self.message = "waiting"
        self.seconds = 0.0
        self.output = None
        self.finish: Optional[Callable] = None
        self._cancel = threading.Event()
        self.future: Optional[concurrent.futures.Future] = None
        #: The child process the job's function is waiting on, if any (a ``subprocess_job.ChildProcess``):
        #: :meth:`cancel` stops it at once, from the main thread, instead of at its next progress report.
        self.process = None

    def report(self, fraction: float, message: str = "") -> bool:
        """Progress callback (engine convention): returns False once cancelled."""
        self.progress = float(min(max(fraction, 0.0), 1.0))
        if message:
            self.message = message
        return not self._cancel.is_set()

    def check(self) -> None:
        if self._cancel.is_set():
            raise InterruptedError(f"{self.description} cancelled")

    def cancel(self) -> None:
        self._cancel.set()
        process = self.process  # read after setting the flag: the worker checks the flag after assigning it
        if process is not None:
            process.stop()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def done(self) -> bool:
        return self.future is not None and self.future.done()

    def wait(self, timeout: Optional[float] = None):
        """Block until the worker is done (tests; never from the GUI)."""
        concurrent.futures.wait([self.future], timeout=timeout)
        return self.done()


class JobWorker:
    """The single worker thread that runs :class:`BackgroundJob` functions in submission order.

    At most one *background* job (low priority: warming fine tiles) is known at a time; submitting any other
    job cancels it first, so it never delays work the user asked for (it stops before its next tile).
    """

    def __init__(self, threadNamePrefix: str) -> None:
        self.threadNamePrefix = threadNamePrefix
        self._executor: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._background: Optional[BackgroundJob] = None
        self._unfinished: list[BackgroundJob] = []  # submitted, and not yet through finish()

    def executor(self) -> concurrent.futures.ThreadPoolExecutor:
        # One worker: jobs run in order, and the network is never run twice at once. Started on first use.
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=self.threadNamePrefix)
        return self._executor

    def submit(self, job: BackgroundJob, fn: Callable, background: bool = False) -> BackgroundJob:
        """Queue ``fn`` for ``job``; a user job (``background=False``) preempts the background job (see
        :meth:`preemptBackground`), and a background job replaces the previous one (cancelled)."""
        self.preemptBackground()
        if background:
            self._background = job
        # A done job without a finish step (tile warming) is never collected: nothing left to cancel or apply.
        self._unfinished = [j for j in self._unfinished if not (j.done() and j.finish is None)] + [job]

        def run():
            t0 = time.perf_counter()
            job.report(0.0, "started")
            try:
                job.check()  # cancelled while queued
                return fn()
            finally:
                job.seconds = time.perf_counter() - t0
        job.future = self.executor().submit(run)
        return job

    def preemptBackground(self) -> Optional[BackgroundJob]:
        """Cancel the background job if it is queued or running; returns it then (None otherwise)."""
        job, self._background = self._background, None
        if job is None or job.done():
            return None
        job.cancel()
        return job

    def cancelAll(self) -> None:
        """Cancel every job submitted and not yet finished, queued, running or done: a done one is then refused
        by :meth:`finish` (the scene its result belongs to is closing)."""
        for job in self._unfinished:
            job.cancel()
        self._unfinished = []
        self._background = None

    def backgroundJob(self) -> Optional[BackgroundJob]:
        """The background job while it is queued or running, else None."""
        job = self._background
        return job if job is not None and not job.done() else None

    #: Seconds the poll timer's slot gives the worker thread per tick (kept well under the 50 ms GUI budget).
    YIELD_SECONDS = 0.02

    def yieldToWorker(self, seconds: Optional[float] = None) -> None:
        """Main thread, from the poll timer: release the interpreter lock for a moment so the worker runs.

        Slicer's PythonQt keeps the lock while the Qt loop idles, so a Python worker thread only runs when the
        main thread gives it up (the engine's heavy parts - onnxruntime, numpy - release it themselves once
        entered). Sleeping here, in the timer's slot, hands the worker the lock every tick without blocking the
        GUI for more than ``YIELD_SECONDS``. (Embeddings, the robust priors and few-shot training and applying do
        not depend on it: inside Slicer they run in a child process, see ``subprocess_job`` and
        ``fewshot_process``; the worker then only relays their progress.)
        """
        if self._executor is not None:
            time.sleep(self.YIELD_SECONDS if seconds is None else seconds)

    def finish(self, job: BackgroundJob) -> Any:
        """Main thread: collect a finished job (re-raises its error or InterruptedError) and apply its result,
        unless the job was cancelled meanwhile (InterruptedError: it finished before noticing)."""
        if job in self._unfinished:
            self._unfinished.remove(job)
        result = job.future.result()
        job.check()
        if job.finish is not None:
            job.output = job.finish(result)
        job.progress = 1.0
        return job.output


class JobQueue:
    """The widget's user jobs in submission order, each with the main-thread step to run once it is finished.

    :class:`JobWorker` runs jobs one at a time in submission order, so the first entry is the job running (or next
    to run) and the first to finish. The widget shows its progress, finishes it, runs its step, then goes on with
    the next: a job started while another runs waits behind it instead of replacing it (the replaced job was never
    finished, so its result and the step that applies it were lost).
    """

    def __init__(self) -> None:
        self._entries: list[tuple[BackgroundJob, Optional[Callable[[], None]]]] = []

    def add(self, job: BackgroundJob, after: Optional[Callable[[], None]] = None) -> None:
        self._entries.append((job, after))

    def current(self) -> Optional[BackgroundJob]:
        """The job the progress bar shows (the first), or None."""
        return self._entries[0][0] if self._entries else None

    def waiting(self) -> int:
        """How many jobs wait behind the current one."""
        return max(len(self._entries) - 1, 0)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, job: object) -> bool:
        return any(queued is job for queued, _ in self._entries)

    def takeFinished(self) -> Optional[tuple[BackgroundJob, Optional[Callable[[], None]]]]:
        """``(job, after)`` of the current job, removed from the queue, once its worker function has returned
        (the caller then collects it with :meth:`JobWorker.finish` and runs ``after``); None while it runs."""
        if not self._entries or not self._entries[0][0].done():
            return None
        return self._entries.pop(0)

    def cancelCurrent(self) -> Optional[BackgroundJob]:
        """Cancel the current job (the ones behind it still run); returns it, or None when there is none."""
        job = self.current()
        if job is not None:
            job.cancel()
        return job

    def clear(self) -> None:
        """Forget every job (the caller cancels them: ``JobWorker.cancelAll`` at scene close)."""
        self._entries = []

    def statusText(self, note: str = "") -> str:
        """The status line: the current job's message, how many jobs wait behind it, and ``note``."""
        job = self.current()
        if job is None:
            return note
        waiting = self.waiting()
        notes = ([f"{waiting} more job{'s' if waiting > 1 else ''} waiting"] if waiting else []) + (
            [note] if note else [])
        return f"{job.message} ({'; '.join(notes)})" if notes else job.message
