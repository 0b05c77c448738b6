"""Evaluation hands a method that asks for it batches of one task's test images (PROTEUS's per-batch retrieval)."""

import numpy as np
import pytest
import torch
from torch import nn

from ntkcl.data.plugin import Samples
from ntkcl.data.stream import Stream
from ntkcl.engine.distributed import DistributedContext
from ntkcl.engine.evaluate import ScoringLoader, evaluate


class LabelReader(nn.Module):
    """Predicts the label written into each image's pixels and records the labels of every batch it sees."""

    def __init__(self, per_task: bool, num_classes: int):
        super().__init__()
        self.per_task, self.num_classes, self.batches = per_task, num_classes, []

    @property
    def evaluates_per_task_batch(self) -> bool:
        return self.per_task

    def predict_with_task(self, images):
        labels = images[:, 0, 0, 0].round().long()
        self.batches.append(labels.tolist())
        return torch.nn.functional.one_hot(labels, self.num_classes).float(), labels // 2


@pytest.mark.parametrize("per_task", [True, False])
def test_each_batch_holds_one_tasks_images_when_asked(per_task):
    labels = np.tile(np.arange(6), 3)  # interleaved: consecutive test images belong to different tasks
    images = np.repeat(labels.astype(np.uint8)[:, None, None, None], 2, axis=1).repeat(2, axis=2).repeat(3, axis=3)
    samples = Samples(labels, arrays=images)
    stream = Stream.build(samples, samples, 6, 2, 2, order_seed=None)

    def transform(image):
        return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)

    scoring = ScoringLoader(stream, transform, DistributedContext(), batch_size=4, num_workers=0)
    method = LabelReader(per_task, 6)
    scores = evaluate(method, scoring, stream.task(2))
    assert scores.counts == [(6, 6)] * 3 and scores.retrieval == [(6, 6)] * 3
    mixed = [batch for batch in method.batches if len({label // 2 for label in batch}) > 1]
    assert (not mixed) == per_task
