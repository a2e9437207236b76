"""Training: the loop, its data and augmentation, EMA (classic and EDM2's power EMA).

    loop.py             ``train(TrainConfig)``: EDM's recipe (Sec. 5, App. F), checkpoints,
                        resume, torchrun DDP
    edm2.py             EDM2's recipe (inverse-sqrt learning rate, power EMA, snapshots)
    memory.py           the memory a step needs, and the micro-batch that fits
    data.py             image folders, MNIST, digits, toy sets; the infinite loader
    augment.py          non-leaking augmentation (EDM App. F.2)
    phema.py            power-function EMA and its post-hoc reconstruction (EDM2 Sec. 3, Alg. 3)
    phema_snapshots.py  the snapshot files of power EMA
    distributed.py      process groups for torchrun

May import: the core, ``nets``, ``io`` and ``sampling``. Never imports ``eval``, ``serve``
or ``cli``.
"""

from .loop import EMA, TrainConfig, train

__all__ = ["EMA", "TrainConfig", "train"]
