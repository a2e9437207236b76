"""Training: the loop, its data and augmentation, EMA (classic and EDM2's power EMA).

    loop.py             ``train(TrainConfig)``: EDM's recipe (Sec. 5, App. F), the loop over the
                        steps, a checkpoint on Ctrl-C, torchrun DDP
    config.py           TrainConfig, its defaults (with_defaults), --resume's options, checks
    state.py            TrainState: what the loop carries from step to step
    start.py            building a run from its options, or from its newest checkpoint
    step.py             one step's parts: learning rate, --xflip, gradient accumulation
    checkpointing.py    writing, finding and restoring training checkpoints (bit-exact resume)
    run_folder.py       this process (rank, device) and the run folder's log
    reporting.py        loss.png, sample grids, the run's summary
    ema.py              the classic EMA of the weights (EDM App. F.3)
    edm2.py             EDM2's recipe (inverse-sqrt learning rate, power EMA, snapshots)
    memory.py           the memory a step needs, and the micro-batch that fits
    data.py             ``--data`` (load_dataset), dataset_stats; re-exports the loaders below
    datasets.py         in-memory data sets and the pad / resize / channel transforms
    small_sets.py       scikit-learn digits and the toy 1-D / 2-D distributions
    mnist.py            MNIST from its IDX files
    image_folder.py     image folders root/<label>/<file>
    batch_stream.py     the endless, resumable, rank-sharded batches
    augment.py          non-leaking augmentation (EDM App. F.2)
    phema.py            power-function EMA and its post-hoc reconstruction (EDM2 Sec. 3, Alg. 3)
    phema_snapshots.py  the snapshot files of power EMA
    distributed.py      process groups for torchrun, the denoiser under DDP

May import: the core, ``nets``, ``io`` and ``sampling``. Never imports ``eval``, ``serve``
or ``cli``.
"""

from .loop import EMA, TrainConfig, train

__all__ = ["EMA", "TrainConfig", "train"]
