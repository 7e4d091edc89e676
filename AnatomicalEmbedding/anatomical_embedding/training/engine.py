"""The training loop shared by every method (single process or DDP via ``torchrun``).

Sample stream: the global sample index ``g = step * batch_size + b`` alone decides which case and
which random draws (``np.random.default_rng([seed, g])``) a sample uses. Rank ``r`` of ``W`` takes
``b`` in ``[r * B/W, (r + 1) * B/W)``. So a DDP run sees exactly the samples of a single-process run
with the same global batch, and a resumed run continues the stream where it stopped.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from anatomical_embedding.methods.base import DataInfo, Method, StepContext
from anatomical_embedding.training import distributed as D
from anatomical_embedding.training.checkpoints import CheckpointManager, load_resume_checkpoint, rng_state, set_rng_state
from anatomical_embedding.training.config import ENGINE_VERSION, RunConfig, save_run_config
from anatomical_embedding.training.progress import ProgressWriter, stop_file
from anatomical_embedding.training.runlock import RunFolderBusy, RunLock

log = logging.getLogger(__name__)

EXIT_OK, EXIT_STOPPED = 0, 130


class SampleStream(Dataset):
    """Map-style view of the sample stream: index ``g`` -> ``method.make_sample(case, rng, epoch)``."""

    def __init__(self, base, method: Method, labelled: np.ndarray, seed: int, batch_size: int,
                 steps_per_epoch: int, memory_cache: int = 4) -> None:
        self.base, self.method, self.labelled = base, method, labelled
        self.seed, self.batch_size, self.steps_per_epoch = seed, batch_size, steps_per_epoch
        self.memory_cache = memory_cache
        self._cache: dict[int, dict] = {}

    def case_index(self, g: int, epoch: int) -> int:
        n = len(self.base)
        weights = self.method.case_weights(self.labelled, epoch)
        if weights is None:  # each pass over the stream is a permutation of the cases
            perm = np.random.default_rng([self.seed, 1, g // n]).permutation(n)
            return int(perm[g % n])
        return int(np.random.default_rng([self.seed, 2, g]).choice(n, p=weights))

    def _case(self, idx: int) -> dict:
        item = self._cache.get(idx)
        if item is None:
            item = self.base[idx]
            if self.memory_cache > 0:
                if len(self._cache) >= self.memory_cache:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[idx] = item
        return item

    def __len__(self) -> int:  # pragma: no cover - indices come from StreamSampler
        return 2**62

    def __getitem__(self, g: int) -> dict:
        epoch = (g // self.batch_size) // self.steps_per_epoch
        item = self._case(self.case_index(g, epoch))
        return self.method.make_sample(item, np.random.default_rng([self.seed, 0, g]), epoch)


class StreamSampler(Sampler):
    def __init__(self, start_step: int, total_steps: int, batch_size: int, rank: int, world: int) -> None:
        self.start, self.total, self.batch, self.rank, self.world = start_step, total_steps, batch_size, rank, world

    def __iter__(self):
        local = self.batch // self.world
        for step in range(self.start, self.total):
            for b in range(self.rank * local, (self.rank + 1) * local):
                yield step * self.batch + b

    def __len__(self) -> int:
        return max(0, self.total - self.start) * (self.batch // self.world)


def _scan_labels(ds, spec) -> int:
    """Largest label value over the labelled cases (reads the cached preprocessed items)."""
    best = 0
    for n, case in enumerate(spec.cases):
        if case.label is not None:
            lab = ds[n].get("label")
            if lab is not None:
                best = max(best, int(lab.max()))
    return best


def _lr_lambda(cfg, total_steps: int, stage_starts=(0,)):
    """The schedule factor per step: linear warm-up, then ``lr_schedule`` within each stage (a stage starts at
    each of ``stage_starts``; the last runs to ``total_steps``), so every stage decays from the base rate."""
    warm, sched = cfg.warmup_steps, cfg.lr_schedule
    if sched not in ("cosine", "constant", "poly"):
        raise ValueError(f"train.lr_schedule must be cosine, constant or poly, got {sched!r}")
    starts = sorted({0, *(int(s) for s in stage_starts if 0 < int(s) < total_steps)})
    ends = starts[1:] + [max(total_steps, starts[-1] + 1)]

    def f(step: int) -> float:
        if warm > 0 and step < warm:
            return (step + 1) / warm
        if sched == "constant":
            return 1.0
        n = max(i for i, s in enumerate(starts) if s <= step) if step >= 0 else 0
        lo = max(starts[n], warm) if n == 0 else starts[n]
        t = (step - lo) / max(1, ends[n] - lo)
        if sched == "poly":
            return (1.0 - min(1.0, t)) ** 0.9
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
    return f


def optimizer_step(scaler, opt) -> bool:
    """``scaler.step(opt)`` and ``scaler.update()``; False when the scaler skipped the step (fp16 gradients with
    inf/NaN: it lowers its scale). Without fp16 the step is always applied."""
    if not scaler.is_enabled():
        scaler.step(opt)
        scaler.update()
        return True
    before = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    return not scaler.get_scale() < before


def _scaled_lambda(schedule, factor):
    """The engine's schedule times a parameter group's own factor.

    A plain function on purpose: LambdaLR saves the ``__dict__`` of callable objects in its state, and the
    schedule is rebuilt from the config on resume anyway.
    """
    def f(step: int) -> float:
        return schedule(step) * factor(step)
    return f


@dataclass
class _Stop:
    signal: str | None = None


class Trainer:
    """Builds data, method, optimiser and DDP from a :class:`RunConfig`, then ``run()``."""

    def __init__(self, cfg: RunConfig, data: str | Path, out: str | Path, labels: str | Path | None = None,
                 resume: bool = False, echo_progress: bool = True, started_at: float | None = None,
                 keep_run_lock: bool = False) -> None:
        self.cfg, self.run_dir, self.resume = cfg, Path(out), resume
        # The run folder's lock (runlock; rank 0 holds it). keep_run_lock: run() returns still holding it, for work
        # on the run folder after training (train.py's export), and the caller calls release_run_lock().
        self.keep_run_lock = keep_run_lock
        self.run_lock: RunLock | None = None
        # Wall-clock start of this run's process (train.py passes its own, taken before the imports): a stop file
        # older than it is a stale request; a newer one (a stop asked for during the imports or the set-up, e.g. on
        # Windows, where the stop file is the only way) is honoured at the first step.
        self.started_at = time.time() if started_at is None else started_at
        self.echo_progress = echo_progress  # False: progress lines go to progress.jsonl only
        self.data, self.labels = data, labels

    # ------------------------------------------------------------------ setup
    def _device(self) -> torch.device:
        want = self.cfg.train.device
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want == "cuda" and not torch.cuda.is_available():
            raise ValueError("train.device=cuda but no CUDA GPU is available; use train.device=cpu")
        return torch.device(want)

    def _amp(self, device: torch.device) -> torch.dtype | None:
        amp = self.cfg.train.amp
        if amp == "auto":
            return torch.bfloat16 if device.type == "cuda" else None
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]

    def _drop_stale_stop_request(self) -> None:
        if int(os.environ.get("RANK", "0")) != 0:
            return
        path = stop_file(self.run_dir)
        try:
            if path.stat().st_mtime < self.started_at:
                path.unlink(missing_ok=True)
                log.info("removed a stale stop request %s (older than this run)", path)
        except FileNotFoundError:
            pass

    def _lock_run_dir(self, dist_info: D.DistInfo) -> None:
        """Rank 0 takes the run folder's lock; every rank learns the outcome, so that none waits in a collective
        for a rank 0 that has given up (all raise :class:`RunFolderBusy`)."""
        problem = ""
        if dist_info.is_main and self.run_lock is None:
            try:
                self.run_lock = RunLock(self.run_dir).acquire()
            except RunFolderBusy as exc:
                problem = str(exc)
        if dist_info.enabled and self._agree_stop(_Stop("busy" if problem else None), dist_info):
            problem = problem or f"rank 0 could not lock the run folder {self.run_dir} (see its message)"
        if problem:
            raise RunFolderBusy(problem)

    def release_run_lock(self) -> None:
        if self.run_lock is not None:
            self.run_lock.release()
            self.run_lock = None

    def run(self) -> int:
        """Train; returns EXIT_OK or EXIT_STOPPED. Refuses (RunFolderBusy) a run folder another process trains."""
        try:
            return self._run()
        finally:
            if not self.keep_run_lock:
                self.release_run_lock()

    def _run(self) -> int:
        from anatomical_embedding.data.datasets import DatasetSpec, build_dataset
        from anatomical_embedding.methods import get_method

        run_t0 = time.perf_counter()  # train.max_seconds counts from here
        tc = self.cfg.train
        if tc.amp not in ("auto", "bf16", "fp16", "none"):
            raise ValueError(f"train.amp must be auto, bf16, fp16 or none, got {tc.amp!r}")
        device = self._device()
        dist_info = D.init_distributed(device.type)
        if tc.batch_size % dist_info.world_size:
            raise ValueError(f"train.batch_size={tc.batch_size} must be divisible by the {dist_info.world_size} ranks")
        if device.type == "cuda":
            torch.cuda.set_device(dist_info.local_rank)
            device = torch.device("cuda", dist_info.local_rank)
        # Before anything touches the run folder (even the stale stop request: it may be the live run's); after
        # set_device, as the ranks agree on the outcome with a collective (NCCL: one GPU per rank).
        self._lock_run_dir(dist_info)
        self._drop_stale_stop_request()
        if tc.threads > 0:
            torch.set_num_threads(tc.threads)
        if tc.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        run_dir = self.run_dir
        ckpts = CheckpointManager(run_dir, tc.keep_last)
        # Every rank checks (no rank may wait in a collective for one that has failed).
        if self.resume and not ckpts.has_checkpoint():
            raise FileNotFoundError(f"--resume: no checkpoint {ckpts.dir / 'last.pt'} to resume from")
        if not self.resume and ckpts.has_checkpoint():
            raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it or choose a new --out")

        method_cls = get_method(self.cfg.method)
        spec = DatasetSpec.from_path(self.data, self.labels)
        prep = method_cls.preprocess_config(self.cfg.method_config)
        spec.check_volumes(min_size_ijk=method_cls.min_image_size(self.cfg.method_config), spacing=prep.spacing,
                           allow_2d=method_cls.accepts_2d(self.cfg.method_config))
        cache = Path(tc.cache_dir) if tc.cache_dir else run_dir / "cache"
        base = build_dataset(spec, prep, cache_dir=cache)
        if dist_info.is_main:  # fill the preprocessing cache once before other ranks read it
            for n in range(len(base)):
                base[n]
        D.barrier()
        labelled = np.array([c.label is not None for c in spec.cases])
        info = DataInfo(len(spec.cases), int(labelled.sum()), _scan_labels(base, spec) if labelled.any() else 0,
                        spec.source)
        self.cfg.method_config = method_cls.configure_from_data(self.cfg.method_config, info)
        torch.manual_seed(tc.seed)
        method: Method = method_cls(self.cfg.method_config).to(device)
        if not self.resume:  # e.g. a later Adam/Eve stage starting from the previous stage's run
            method.load_initial_weights()
        if tc.channels_last:
            method = method.to(memory_format=torch.channels_last_3d)
        steps_per_epoch = max(1, math.ceil(len(spec.cases) / tc.batch_size))
        epochs = tc.epochs or method.default_epochs()
        total = tc.max_steps if tc.max_steps > 0 else epochs * steps_per_epoch

        groups = [g for g in method.param_groups() if g["params"]]
        param_groups = [{"params": list(g["params"])} for g in groups]
        params = [p for g in param_groups for p in g["params"]]  # flat, for gradient clipping
        if tc.optimizer == "adamw":
            opt = torch.optim.AdamW(param_groups, lr=tc.lr, weight_decay=tc.weight_decay)
        elif tc.optimizer == "adam":
            opt = torch.optim.Adam(param_groups, lr=tc.lr, weight_decay=tc.weight_decay)
        elif tc.optimizer == "sgd":
            opt = torch.optim.SGD(param_groups, lr=tc.lr, momentum=tc.sgd_momentum, nesterov=tc.sgd_nesterov,
                                  weight_decay=tc.weight_decay)
        else:
            raise ValueError(f"train.optimizer must be adamw, adam or sgd, got {tc.optimizer!r}")
        schedule = _lr_lambda(tc, total, method.stage_starts(steps_per_epoch, total))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, [schedule if g.get("lr_factor") is None else _scaled_lambda(schedule, g["lr_factor"]) for g in groups])
        amp_dtype = self._amp(device)
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

        start_step, best = 0, None
        if self.resume:
            if dist_info.is_main:
                ckpts.clean_temporaries()
            _, ck = load_resume_checkpoint(ckpts.dir)  # falls back past a damaged last.pt, with a warning
            method.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            scaler.load_state_dict(ck["scaler"])
            sched.load_state_dict(ck["scheduler"])
            rngs = ck["rng"]
            set_rng_state(rngs[dist_info.rank] if dist_info.rank < len(rngs) else rngs[0])
            start_step, best = int(ck["step"]), ck.get("best")
        if dist_info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_run_config(self.cfg, run_dir / "config.toml")

        model = method
        if dist_info.enabled:
            if device.type == "cuda" and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in method.modules()):
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
            model = torch.nn.parallel.DistributedDataParallel(
                # device_ids=None: the module lives on one device and batches are moved already.
                model, device_ids=None,
                find_unused_parameters=method.ddp_find_unused_parameters, broadcast_buffers=False)
        if tc.compile:
            for name in method.compile_targets:
                getattr(method, name).compile()

        stream = SampleStream(base, method, labelled, tc.seed, tc.batch_size, steps_per_epoch, tc.memory_cache)
        loader = DataLoader(
            stream, batch_size=tc.batch_size // dist_info.world_size,
            sampler=StreamSampler(start_step, total, tc.batch_size, dist_info.rank, dist_info.world_size),
            num_workers=tc.num_workers, collate_fn=method.collate, pin_memory=device.type == "cuda",
            persistent_workers=False, prefetch_factor=2 if tc.num_workers > 0 else None,
            # Its own generator: creating the loader's iterator draws a worker base seed, which from the global
            # torch RNG would make a resumed run's global RNG states differ from an uninterrupted run's.
            generator=torch.Generator().manual_seed(tc.seed))

        model_info = {**method.model_info(), "training_data": {"n_cases": len(spec.cases), "source": spec.source},
                      "engine_version": ENGINE_VERSION}
        writer = ProgressWriter(run_dir, tc.tensorboard, echo=self.echo_progress) if dist_info.is_main else None
        if writer:
            writer.event("start", run_dir=str(run_dir), method=self.cfg.method, total_steps=total,
                         start_step=start_step, world_size=dist_info.world_size, device=str(device),
                         n_cases=len(spec.cases))

        stop = _Stop()
        old_handlers = {}
        stop_path = stop_file(run_dir)

        def _handler(signum, frame):  # finish the current step, checkpoint, exit 130
            stop.signal = signal.Signals(signum).name
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                old_handlers[sig] = signal.signal(sig, _handler)
            except ValueError:  # not the main thread
                pass

        def checkpoint(step: int, epoch: int, metric: float | None) -> Path | None:
            nonlocal best
            is_best = metric is not None and math.isfinite(metric) and (best is None or metric < best)
            if is_best:
                best = float(metric)
            rngs = D.gather_objects(rng_state())
            if not dist_info.is_main:
                return None
            state = {"format": 1, "step": step, "epoch": epoch, "model": method.state_dict(),
                     "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                     "scheduler": sched.state_dict(), "rng": rngs, "best": best,
                     "config": self.cfg.to_dict(), "model_info": {**model_info, "step": step}}
            path = ckpts.save(state, step, is_best)
            writer.event("checkpoint", step=step, path=str(path), best=bool(is_best))
            return path

        bar = None
        if writer and tc.progress_bar:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=start_step, desc=f"train {self.cfg.method}", unit="step", dynamic_ncols=True)
        method.train()
        acc: dict[str, float] = {}
        n_acc, t0, samples = 0, time.perf_counter(), 0
        step = start_step
        last_metric = None
        eval_metrics: dict[str, float] = {}
        exit_code = EXIT_OK
        finished = False
        try:
            for batch in loader:
                epoch = step // steps_per_epoch
                batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
                if tc.channels_last:
                    batch = {k: v.contiguous(memory_format=torch.channels_last_3d)
                             if torch.is_tensor(v) and v.dim() == 5 and v.is_floating_point() else v
                             for k, v in batch.items()}
                ctx = StepContext(step, epoch, total, dist_info.rank, dist_info.world_size, D.all_gather_cat)
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    loss, terms = model(batch, ctx)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if tc.grad_clip > 0:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
                applied = optimizer_step(scaler, opt)
                sched.step()
                if applied:  # a step the fp16 scaler skipped (inf/NaN) moves neither EMA copies nor queues
                    method.after_optimizer_step(ctx)
                step += 1
                samples += tc.batch_size
                acc["loss"] = acc.get("loss", 0.0) + float(loss.detach())
                for k, v in terms.items():
                    acc[k] = acc.get(k, 0.0) + float(v)
                n_acc += 1
                if bar:
                    bar.update(1)
                if step % tc.log_every == 0 or step == total:
                    keys = sorted(acc)
                    vals = D.all_reduce_mean(torch.tensor([acc[k] / n_acc for k in keys], dtype=torch.float64))
                    means = dict(zip(keys, vals.tolist()))
                    last_metric = means.get(tc.best_metric, eval_metrics.get(tc.best_metric, means["loss"]))
                    dt = max(time.perf_counter() - t0, 1e-9)
                    sps = samples / dt
                    gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
                    if writer:
                        lr = sched.get_last_lr()[0]
                        loss_mean = means.pop("loss")
                        writer.event("progress", step=step, total_steps=total, epoch=epoch, loss=loss_mean,
                                     terms=means, lr=lr, samples_per_s=sps,
                                     eta_s=(total - step) * tc.batch_size / max(sps, 1e-9), gpu_mem_mb=gpu)
                        writer.metrics(step, epoch, loss_mean, means, lr, sps, gpu)
                    acc, n_acc, t0, samples = {}, 0, time.perf_counter(), 0
                if method.eval_every > 0 and (step % method.eval_every == 0 or step == total):
                    eval_metrics = self._evaluate(method, base, labelled, step, steps_per_epoch, total, dist_info,
                                                  device, amp_dtype, writer)
                    if tc.best_metric in eval_metrics:
                        last_metric = eval_metrics[tc.best_metric]
                if stop.signal is None and stop_path.exists():  # the stop file (every platform)
                    stop.signal = "STOP_FILE"
                if stop.signal is None and tc.max_seconds and time.perf_counter() - run_t0 >= tc.max_seconds:
                    stop.signal = "TIME_LIMIT"  # train.max_seconds
                stop_now = self._agree_stop(stop, dist_info)
                if step == total and method.calibration_samples > 0:
                    n_cal = self._calibrate(method, stream, total * tc.batch_size, tc.batch_size // dist_info.world_size,
                                            dist_info, device)
                    model_info["calibration_samples"] = n_cal
                if step % tc.ckpt_every == 0 or step == total or stop_now:
                    path = checkpoint(step, step // steps_per_epoch, last_metric)
                if stop_now:
                    if writer:
                        writer.event("stopped", step=step, signal=stop.signal or "SIGTERM",
                                     checkpoint=str(ckpts.dir / "last.pt"))
                    exit_code = EXIT_STOPPED
                    break
            if exit_code == EXIT_STOPPED:
                stop_path.unlink(missing_ok=True)
            if exit_code == EXIT_OK and step < total:
                raise RuntimeError(f"data loader ended at step {step} before {total}")
            if exit_code == EXIT_OK and writer:
                writer.event("done", step=step, run_dir=str(run_dir))
            finished = True  # every rank gets here together (same steps; stops are agreed)
        except Exception as exc:
            if writer:
                writer.event("error", message=f"{type(exc).__name__}: {exc}")
            raise
        finally:
            if bar:
                bar.close()
            if writer:
                writer.close()
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
            D.cleanup(synchronise=finished)
        return exit_code

    @staticmethod
    def _calibrate(method: Method, stream: SampleStream, first: int, local_batch: int, dist_info,
                   device: torch.device) -> int:
        """Pass ``method.calibration_samples`` fresh samples (stream indices from ``first``, past the training
        stream) to ``method.calibrate_for_inference``; every rank the same number of batches (SyncBatchNorm)."""
        world = dist_info.world_size
        n = math.ceil(method.calibration_samples / world) * world
        idx = list(range(first + dist_info.rank, first + n, world))

        def batches():
            for a in range(0, len(idx), local_batch):
                yield method.collate([stream[g] for g in idx[a: a + local_batch]])["image"].to(device)

        t0 = time.perf_counter()
        method.calibrate_for_inference(batches())
        log.info("calibrated %s for dense inference on %d samples in %.1f s", type(method).__name__, n,
                 time.perf_counter() - t0)
        return n

    @staticmethod
    def _evaluate(method: Method, base, labelled: np.ndarray, step: int, steps_per_epoch: int, total: int,
                  dist_info, device: torch.device, amp_dtype, writer) -> dict[str, float]:
        """The method's validation hook (all ranks), logged as an ``eval`` event."""
        t0 = time.perf_counter()
        ctx = StepContext(step, step // steps_per_epoch, total, dist_info.rank, dist_info.world_size, D.all_gather_cat)
        method.eval()
        try:
            with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                                 enabled=amp_dtype is not None):
                metrics = {k: float(v) for k, v in method.evaluate(base, labelled, ctx, device).items()}
        finally:
            method.train()
        if writer and metrics:
            writer.event("eval", step=step, metrics=metrics, seconds=round(time.perf_counter() - t0, 3))
        return metrics

    @staticmethod
    def _agree_stop(stop: _Stop, dist_info) -> bool:
        """All ranks stop together if any rank got a signal (so the checkpoint collectives line up)."""
        flag = torch.tensor([1.0 if stop.signal else 0.0], dtype=torch.float32)
        if dist_info.enabled:
            flag = D.all_reduce_mean(flag)
        return bool(flag.item() > 0)
