"""The training data order: a pure function of the step, so that a resumed run (and every
rank of a DDP run) sees exactly the data an uninterrupted single process would."""

from __future__ import annotations

import numpy as np
import torch


class IterationBatchSampler:
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
        self.n, self.batch_size, self.seed = num_samples, batch_size, seed
        self.total_steps, self.start_step = total_steps, start_step
        self.rank, self.world_size = rank, world_size
        self._perms: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._perms[epoch]

    def __len__(self) -> int:
        return self.total_steps - self.start_step

    def __iter__(self):
        global_batch = self.batch_size * self.world_size
        for step in range(self.start_step, self.total_steps):
            first = step * global_batch + self.rank * self.batch_size
            batch = []
            for pos in range(first, first + self.batch_size):
                epoch, i = divmod(pos, self.n)
                batch.append((epoch, int(self._permutation(epoch)[i])))
            yield batch


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
