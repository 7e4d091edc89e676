"""The method-agnostic training engine.

* ``config``: ``TrainConfig`` + the method's dataclass, TOML load/save, ``--set`` overrides.
* ``engine``: ``Trainer`` (data stream, AMP, compile, DDP, signals, checkpoints, logging).
* ``checkpoints``: atomic checkpoints, exact resume, ``load_embedder_from_run``, ``build_embedder``.
* ``progress``: JSON-lines progress protocol, ``metrics.csv``, TensorBoard.
* ``distributed``: torchrun/DDP helpers (gloo on CPU, NCCL on CUDA).
* ``momentum``: momentum/EMA updates and the MoCo feature queue.
* ``patches``: overlapping patch pairs with shared points (AEFM, usable by HDSSL).
* ``cli``: the ``train`` sub-command.
"""
