"""The training data order: a pure function of the step, so that a resumed run (and every
rank of a DDP run) sees exactly the data an uninterrupted single process would."""

from __future__ import annotations

import numpy as np
import torch


class StepBatchSampler:
    """The layout every training sampler shares: micro-step ``s`` takes the global positions
    ``s * batch_size * world_size ...``, rank ``r`` its ``r``-th slice of them, from
    ``start_step`` to ``total_steps``; a subclass says what a position is (:meth:`key`), a
    pure function of it, so a resume and every rank see what one uninterrupted process would."""

    def __init__(self, batch_size: int, seed: int, total_steps: int, start_step: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.batch_size, self.seed = batch_size, seed
        self.total_steps, self.start_step = total_steps, start_step
        self.rank, self.world_size = rank, world_size

    def key(self, position: int):
        raise NotImplementedError

    def __len__(self) -> int:
        return self.total_steps - self.start_step

    def __iter__(self):
        global_batch = self.batch_size * self.world_size
        for step in range(self.start_step, self.total_steps):
            first = step * global_batch + self.rank * self.batch_size
            yield [self.key(pos) for pos in range(first, first + self.batch_size)]


class IterationBatchSampler(StepBatchSampler):
    """This rank's ``(epoch, index)`` pairs for every micro-step from ``start_step`` on.

    The global sample stream is the concatenation of one permutation of the dataset per epoch,
    each drawn from ``(seed, epoch)``. Micro-step ``s`` takes the ``batch_size * world_size``
    samples at ``s * batch_size * world_size`` and rank ``r`` its ``r``-th slice, so the stream
    (and every sample's augmentation, seeded by ``(seed, epoch, index)``) is a pure function of
    the step: a resumed run continues with exactly the data an uninterrupted one would see, and
    2 processes x batch 2 see the same samples as 1 process x batch 4.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, total_steps: int,
                 start_step: int = 0, rank: int = 0, world_size: int = 1):
        if num_samples < 1:
            raise ValueError("cannot sample from an empty dataset")
        super().__init__(batch_size, seed, total_steps, start_step, rank, world_size)
        self.n = num_samples
        self._perms: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._perms[epoch]

    def key(self, position: int) -> tuple[int, int]:
        epoch, i = divmod(position, self.n)
        return epoch, int(self._permutation(epoch)[i])


class EpochIndexed(torch.utils.data.Dataset):
    """Wraps a dataset so that ``ds[(epoch, index)]`` draws that sample's augmentation."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        image, label = self.dataset.load(index)
        rng = np.random.default_rng([self.dataset.seed, epoch, index])
        return self.transform(image, label, rng)
