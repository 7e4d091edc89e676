"""Few-shot training and applying in a child process, so they progress while Slicer holds the interpreter lock.

The same machinery as the embedding's (:class:`~AnatomicalEmbeddingLib.subprocess_job.ChildProcess`; see that
module for why): the parent writes the cases' images and label maps (training) or the image and the head
(applying) to a temporary folder, the child runs the engine's ``train_head`` or ``apply_head`` with the viewer's
model file, backend and device, and hands back the head or the label map as a file in that folder, written in
full before the parent hears of it. The parent loads it (``FewShotHead.load``: a plain ``.npz``, no pickle) and
the logic applies it on the main thread as before. Each case's voxel sample is kept in the embedding disk cache
(``train_head(sample_cache=...)``), so retraining after adding a case runs the network on that case only, as the
in-process memo did.

Child events (besides those of :func:`~AnatomicalEmbeddingLib.subprocess_job.runChild`): ``progress`` (the
engine's fraction and message, at most about ``PROGRESS_STEPS`` lines) and ``done`` with the result's ``file``
and the ``network_runs`` the child made.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from typing import Callable, Optional, Sequence

from AnatomicalEmbeddingLib.subprocess_job import PROGRESS_STEPS, ChildProcess, CountingModel, childParser, emit, \
    loadVolume, openModelAndCache, runChild, saveVolume

TRAIN, APPLY = "train", "apply"
#: The head handed to an applying child, and the results children hand back (names inside the work folder).
HEAD_INPUT, HEAD_OUTPUT, LABEL_OUTPUT = "head_in.npz", "head.npz", "label.npz"


class FewShotProcess(ChildProcess):
    """A few-shot head trained (:meth:`training`) or applied (:meth:`applying`) by a child process.

    ``run(report)`` returns the trained ``FewShotHead`` or the label map (an engine Volume on the image's grid),
    as ``train_head`` / ``apply_head`` in this process would; the rest is :class:`ChildProcess`'s.
    """

    childModule = "AnatomicalEmbeddingLib.fewshot_process"
    tempPrefix = "AnatomicalEmbedding-fewshot-"

    def __init__(self, task: str, volumes: Sequence, modelPath, backend: str, device: str, cache, *,
                 extra: Sequence[str] = (), head=None, python: Optional[str] = None,
                 tempDir: Optional[str] = None) -> None:
        super().__init__(volumes, modelPath, backend, device, cache, python, tempDir)
        self.task = task
        self.what = "few-shot training" if task == TRAIN else "few-shot segmentation"
        self.advice = "free memory, or train on fewer or smaller cases" if task == TRAIN else \
            "free memory or segment a smaller volume"
        self.extra = list(extra)
        self.head = head
        #: Network windows the child ran (after run(); tests: the sample cache's effect).
        self.networkRuns: Optional[int] = None

    @classmethod
    def training(cls, images: Sequence, labels: Sequence, classNames: dict, colors: dict, config,
                 **settings) -> "FewShotProcess":
        """Train on the cases (engine Volumes: images and label maps with the ``classNames`` values)."""
        volumes = [v for pair in zip(images, labels) for v in pair]  # image, label, image, label ...
        extra = ["--classes", json.dumps({str(k): str(v) for k, v in classNames.items()}),
                 "--colors", json.dumps({str(k): list(map(float, c)) for k, c in (colors or {}).items()}),
                 "--config", json.dumps(dataclasses.asdict(config))]
        return cls(TRAIN, volumes, extra=extra, **settings)

    @classmethod
    def applying(cls, image, head, **settings) -> "FewShotProcess":
        """Segment ``image`` with ``head`` (it need not be on disk: the parent writes it for the child)."""
        return cls(APPLY, [image], head=head, **settings)

    def arguments(self) -> list:
        return ["--task", self.task, *self.extra] + (["--head", HEAD_INPUT] if self.task == APPLY else [])

    def writeInputs(self) -> list:
        paths = super().writeInputs()
        if self.task == APPLY:
            self.head.save(self.workDir / HEAD_INPUT)  # the head in memory need not be on disk
        return paths

    def _finish(self, done: dict):
        from anatomical_embedding.fewshot.head import FewShotHead

        self.networkRuns = int(done.get("network_runs", 0))
        path = self.inWorkDir(done["file"])
        return FewShotHead.load(path) if self.task == TRAIN else loadVolume(path)


# ---- child ------------------------------------------------------------------------------------------
def _throttledProgress() -> Callable[[float, str], bool]:
    """The engine's progress callback: a ``progress`` line when the fraction passes another 1/PROGRESS_STEPS (so
    the output stays far below a pipe's size). The child is never cancelled this way: the parent terminates it."""
    last = [-1]

    def progress(fraction: float, message: str = "") -> bool:
        step = int(float(fraction) * PROGRESS_STEPS)
        if step != last[0]:
            last[0] = step
            emit("progress", fraction=round(float(fraction), 4), message=str(message))
        return True

    return progress


def _arguments(argv: Optional[list]) -> argparse.Namespace:
    parser = childParser("python -m AnatomicalEmbeddingLib.fewshot_process",
                         "train a few-shot head on cases, or segment a volume with one",
                         "folder for the head or label map handed back")
    parser.add_argument("--task", choices=(TRAIN, APPLY), required=True)
    parser.add_argument("--classes", default="{}", help="training: JSON {label value: segment name}")
    parser.add_argument("--colors", default="{}", help="training: JSON {label value: [r, g, b]}")
    parser.add_argument("--config", default="{}", help="training: the FewShotConfig as JSON")
    parser.add_argument("--head", help="applying: the head's .npz (in --out's folder)")
    return parser.parse_args(argv)


def _train(args: argparse.Namespace, model, cache, out: pathlib.Path) -> str:
    from anatomical_embedding.fewshot.head import FewShotConfig, train_head

    volumes = [loadVolume(path) for path in args.volume]
    if len(volumes) % 2:
        raise ValueError("training needs an image and a label map per case (--volume pairs)")
    names = {int(k): v for k, v in json.loads(args.classes).items()}
    colors = {int(k): v for k, v in json.loads(args.colors).items()}
    head = train_head(model, volumes[0::2], volumes[1::2], names, FewShotConfig(**json.loads(args.config)),
                      progress=_throttledProgress(), colors=colors, sample_cache=cache)
    head.save(out / HEAD_OUTPUT)
    return HEAD_OUTPUT


def _apply(args: argparse.Namespace, model, out: pathlib.Path) -> str:
    from anatomical_embedding.fewshot.head import FewShotHead, apply_head
    from anatomical_embedding.io import atomic_write

    if args.head is None or len(args.volume) != 1:
        raise ValueError("applying needs one --volume and the --head")
    label = apply_head(model, FewShotHead.load(out / pathlib.Path(args.head).name), loadVolume(args.volume[0]),
                       progress=_throttledProgress())
    atomic_write(out / LABEL_OUTPUT, lambda tmp: saveVolume(tmp, label))
    return LABEL_OUTPUT


def _work(args: argparse.Namespace) -> dict:
    model, cache = openModelAndCache(args)
    counting = CountingModel(model)
    out = pathlib.Path(args.out)
    name = _train(args, counting, cache, out) if args.task == TRAIN else _apply(args, counting, out)
    return {"file": name, "network_runs": counting.calls}


def main(argv: Optional[list] = None) -> int:
    """The few-shot child: train (``--task train``) or apply (``--task apply``); see the module doc."""
    args = _arguments(argv)
    return runChild(lambda: _work(args))


if __name__ == "__main__":
    sys.exit(main())
