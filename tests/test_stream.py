"""Class orders against the PyCIL/PILOT/NTK-CL vectors (shared/reference/datasets.md §5) and task cutting."""

import numpy as np
import pytest

from ntkcl.data.plugin import Samples
from ntkcl.data.stream import Stream, class_order, task_sizes
from ntkcl.errors import BadInputError

REFERENCE_ORDERS = [
    (1993, 100, [68, 56, 78, 8, 23, 84, 90, 65, 74, 76]),
    (1993, 200, [168, 136, 51, 9, 183, 101, 171, 99, 42, 159]),
    (1993, 300, [169, 221, 146, 296, 92, 229, 49, 70, 126, 77]),
    (1993, 345, [214, 80, 343, 268, 224, 97, 253, 55, 165, 170]),
    (1993, 50, [43, 41, 23, 14, 13, 40, 42, 22, 16, 45]),
    (1993, 37, [24, 1, 8, 28, 2, 13, 22, 10, 6, 17]),
    (1993, 15, [6, 10, 8, 2, 4, 13, 11, 5, 7, 0]),
    (1993, 10, [4, 2, 7, 6, 0, 3, 5, 8, 9, 1]),
    (1993, 8, [2, 3, 0, 4, 5, 6, 7, 1]),
    (0, 100, [26, 86, 2, 55, 75, 93, 16, 73, 54, 95]),
    (0, 200, [18, 170, 107, 98, 177, 182, 5, 146, 12, 152]),
    (0, 345, [142, 6, 60, 339, 54, 286, 126, 217, 254, 100]),
    (0, 37, [22, 20, 16, 10, 31, 28, 15, 11, 2, 25]),
    (0, 15, [1, 6, 8, 9, 14, 4, 2, 13, 10, 7]),
    (0, 10, [2, 8, 4, 9, 1, 6, 7, 3, 0, 5]),
    (0, 50, [28, 11, 10, 41, 2, 27, 38, 31, 22, 4]),
    (0, 8, [6, 2, 1, 7, 3, 0, 5, 4]),
    (1, 100, [80, 84, 33, 81, 93, 17, 36, 82, 69, 65]),
    (2, 100, [83, 30, 56, 24, 16, 23, 2, 27, 28, 13]),
    (3, 100, [93, 67, 6, 64, 96, 83, 98, 42, 25, 15]),
    (4, 100, [20, 10, 96, 16, 63, 24, 53, 97, 41, 47]),
]


@pytest.mark.parametrize(("seed", "n", "first_ten"), REFERENCE_ORDERS)
def test_class_order_matches_reference_vectors(seed, n, first_ten):
    order = class_order(n, seed)
    assert order[: len(first_ten)] == first_ten
    assert sorted(order) == list(range(n))


def test_no_seed_keeps_base_order_and_explicit_order_is_checked():
    assert class_order(5, None) == [0, 1, 2, 3, 4]
    assert class_order(3, 7, explicit=[2, 0, 1]) == [2, 0, 1]
    with pytest.raises(BadInputError):
        class_order(3, None, explicit=[0, 0, 1])


@pytest.mark.parametrize(
    ("n", "init", "inc", "sizes"),
    [
        (100, 10, 10, [10] * 10),
        (37, 7, 5, [7, 5, 5, 5, 5, 5, 5]),
        (345, 23, 23, [23] * 15),
        (10, 3, 3, [3, 3, 3, 1]),
        (10, 10, 5, [10]),
    ],
)
def test_task_sizes_follow_the_datamanager_rule(n, init, inc, sizes):
    assert task_sizes(n, init, inc) == sizes


@pytest.mark.parametrize(("n", "init", "inc"), [(10, 11, 1), (10, 0, 1), (10, 2, 0), (10, 5, 6)])
def test_protocols_that_do_not_fit_are_bad_input(n, init, inc):
    with pytest.raises(BadInputError):
        task_sizes(n, init, inc)


def test_stream_relabels_into_order_and_cuts_tasks():
    labels = np.repeat(np.arange(4), 3)
    train = Samples(labels=labels, arrays=np.zeros((12, 2, 2), np.uint8), class_names=["a", "b", "c", "d"])
    test = Samples(labels=np.arange(4), arrays=np.zeros((4, 2, 2), np.uint8), class_names=["a", "b", "c", "d"])
    stream = Stream.build(train, test, 4, 2, 2, order_seed=None, explicit_order=[3, 1, 0, 2])
    # base label 3 is shown first -> stream label 0
    assert stream.class_names == ["d", "b", "a", "c"]
    assert stream.test.labels.tolist() == [2, 1, 3, 0]
    first, second = stream.tasks()
    assert (first.known_classes, first.num_new_classes, second.known_classes) == (0, 2, 2)
    assert sorted(stream.train.labels[stream.train_indices(second)].tolist()) == [2, 2, 2, 3, 3, 3]
    assert stream.test_indices(first).tolist() == [1, 3]
    assert stream.task_of_label().tolist() == [0, 0, 1, 1]
