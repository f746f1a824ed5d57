"""Batches filled up to a maximum number of video frames, as the reference's max-frames batching does.

Fixed batch sizes waste memory on short clips and overflow it on long ones; Llama-AVSR's recipe instead fills each
batch up to 1000-1500 video frames per GPU. Here the budget counts padded frames (batch size x longest clip), which
is what the encoders and the LLM actually allocate.

Each epoch: sort by length with lengths rounded up to `bucket_frames` (clips shuffled within a bucket), fill batches
greedily, order the batches by cost, deal them to the processes in groups of `num_replicas` neighbours (so the
processes of one step get batches of similar cost and wait little for each other at the all-reduce), shuffle the
order of the groups. Because the cost of a batch is computed from the rounded lengths, the number of batches depends
only on how many clips fall in each bucket: it is the same every epoch, which Trainer needs (it computes its step
count once from `len(dataloader)`).

Several processes: the stream that `__iter__` yields holds batch k of rank r at position k * num_replicas + r, the
convention of accelerate's `BatchSamplerShard` (what `Trainer`/`accelerator.prepare` wrap a batch sampler in), and
its length is a multiple of `num_replicas`, so every rank gets the same number of batches and no batch twice. Pass
`rank` to get only that rank's batches instead (plain `torch.distributed` without accelerate).
"""

import logging
import math

import numpy as np
from torch.utils.data import Sampler

__all__ = ["MaxFramesBatchSampler"]

logger = logging.getLogger(__name__)


class MaxFramesBatchSampler(Sampler):
    r"""
    Args:
        lengths: video frames of each clip (the datasets' `num_frames` column).
        max_frames: padded-frame budget of one batch on one process (batch size x longest clip in it). A clip longer
            than the budget gets a batch of its own (with a warning at construction).
        max_batch_size: optional cap on the clips in one batch.
        bucket_frames: lengths are rounded up to a multiple of this before sorting and costing; larger buckets give
            more varied batches from epoch to epoch, at a little more padding.
        num_replicas: number of processes (`TrainingArguments.world_size`).
        rank: None to yield all processes' batches interleaved (for accelerate / Trainer), or this process's index.
        shuffle, seed: shuffle within buckets and the order of batches, from (seed, epoch); call `set_epoch`
            (Trainer does) for a new order each epoch. Every process must use the same seed.
        drop_last: drop the cheapest batches that do not fill a last group of `num_replicas`; otherwise repeat the
            cheapest ones to fill it (as DistributedSampler pads).
    """

    def __init__(self, lengths, max_frames: int, max_batch_size: int | None = None, bucket_frames: int = 5,
                 num_replicas: int = 1, rank: int | None = None, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if self.lengths.ndim != 1 or len(self.lengths) == 0:
            raise ValueError("lengths must be a non-empty 1-D sequence of frame counts")
        if (self.lengths <= 0).any():
            raise ValueError("every length must be positive (a clip without frames cannot be batched)")
        if max_frames <= 0 or bucket_frames <= 0 or num_replicas <= 0:
            raise ValueError("max_frames, bucket_frames and num_replicas must be positive")
        if rank is not None and not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        self.max_frames = int(max_frames)
        self.max_batch_size = max_batch_size
        self.bucket_frames = int(bucket_frames)
        self.num_replicas = int(num_replicas)
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self._rounded = -(-self.lengths // self.bucket_frames) * self.bucket_frames
        too_long = int((self._rounded > self.max_frames).sum())
        if too_long:
            logger.warning("%d clips are longer than max_frames=%d; each gets a batch of its own", too_long,
                           self.max_frames)
        self._num_groups = self._count_groups(len(self._batch_sizes(np.sort(self._rounded))))

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def _batch_sizes(self, sorted_lengths: np.ndarray) -> list[int]:
        """Greedy fill over lengths sorted ascending: the batch's cost is its size times its last (longest) length."""
        sizes, size = [], 0
        for length in sorted_lengths.tolist():
            full = self.max_batch_size is not None and size >= self.max_batch_size
            if size and ((size + 1) * length > self.max_frames or full):
                sizes.append(size)
                size = 0
            size += 1
        sizes.append(size)
        return sizes

    def _count_groups(self, num_batches: int) -> int:
        if self.drop_last:
            if num_batches < self.num_replicas:
                raise ValueError(f"only {num_batches} batches for {self.num_replicas} processes with drop_last")
            return num_batches // self.num_replicas
        return math.ceil(num_batches / self.num_replicas)

    def _groups(self) -> list[list[list[int]]]:
        """This epoch's batches as groups of `num_replicas` (one per rank), identical on every process."""
        rng = np.random.default_rng([self.seed, self.epoch])
        ties = rng.random(len(self.lengths)) if self.shuffle else np.arange(len(self.lengths))
        order = np.lexsort((ties, self._rounded))  # by rounded length, random inside a bucket
        sizes = self._batch_sizes(self._rounded[order])
        bounds = np.cumsum([0] + sizes)
        batches = [order[bounds[i] : bounds[i + 1]].tolist() for i in range(len(sizes))]
        costs = [len(b) * int(self._rounded[b[-1]]) for b in batches]
        by_cost = [batches[i] for i in np.argsort(costs, kind="stable")]
        # the cheapest batches are dropped, or repeated to complete the last group
        extra = len(by_cost) % self.num_replicas
        if extra and self.drop_last:
            by_cost = by_cost[extra:]
        elif extra:
            by_cost = [by_cost[i % len(by_cost)] for i in range(self.num_replicas - extra)] + by_cost
        groups = [by_cost[i : i + self.num_replicas] for i in range(0, len(by_cost), self.num_replicas)]
        if self.shuffle:
            groups = [groups[i] for i in rng.permutation(len(groups))]
            # which rank gets the cheapest batch of a group varies, so no rank is always the light one
            groups = [[g[j] for j in rng.permutation(len(g))] for g in groups]
        return groups

    def __iter__(self):
        for group in self._groups():
            if self.rank is None:
                yield from group
            else:
                yield group[self.rank]

    def __len__(self) -> int:
        return self._num_groups * (self.num_replicas if self.rank is None else 1)
