"""Metrics on hand-made accuracy matrices (values worked out by hand in the comments)."""

import pytest

from ntkcl.engine.metrics import AccuracyMatrix


def test_single_task_has_no_forgetting_or_bwt():
    matrix = AccuracyMatrix(correct=[[45]], total=[[50]])
    assert matrix.final_accuracy() == pytest.approx(90.0)
    assert matrix.mean_incremental_accuracy() == pytest.approx(90.0)
    assert matrix.forgetting() is None
    assert matrix.backward_transfer() is None
    assert matrix.old_accuracy() == [None]
    assert matrix.new_accuracy() == [pytest.approx(90.0)]


def test_two_tasks_by_hand():
    # After task 0: 90/100 on task 0. After task 1: 60/100 on task 0, 80/100 on task 1.
    matrix = AccuracyMatrix(correct=[[90], [60, 80]], total=[[100], [100, 100]])
    assert matrix.matrix() == [[90.0, None], [60.0, 80.0]]
    assert matrix.all_seen_accuracy() == [pytest.approx(90.0), pytest.approx(70.0)]
    assert matrix.final_accuracy() == pytest.approx(70.0)
    assert matrix.mean_incremental_accuracy() == pytest.approx(80.0)  # (90 + 70) / 2
    assert matrix.forgetting() == pytest.approx(30.0)  # max(90) - 60
    assert matrix.backward_transfer() == pytest.approx(-30.0)  # 60 - 90
    assert matrix.old_accuracy() == [None, pytest.approx(60.0)]
    assert matrix.new_accuracy() == [pytest.approx(90.0), pytest.approx(80.0)]


def test_three_tasks_sample_weighted_and_max_based_forgetting():
    # Task sizes 10, 30, 20 test images.
    # R = [[80], [50, 90], [70, 60, 100]] (percent)
    matrix = AccuracyMatrix(correct=[[8], [5, 27], [7, 18, 20]], total=[[10], [10, 30], [10, 30, 20]])
    # all-seen: 8/10=80; (5+27)/40=80; (7+18+20)/60=75 -> sample-weighted, not the mean of R's row
    assert matrix.all_seen_accuracy() == [pytest.approx(80.0), pytest.approx(80.0), pytest.approx(75.0)]
    assert matrix.mean_incremental_accuracy() == pytest.approx(235 / 3)
    # forgetting: task0 max(80, 50) - 70 = 10; task1 max(90) - 60 = 30 -> 20
    assert matrix.forgetting() == pytest.approx(20.0)
    # BWT: (70 - 80 + 60 - 90) / 2 = -20
    assert matrix.backward_transfer() == pytest.approx(-20.0)
    # old accuracy after task 2: (7 + 18) / 40 = 62.5
    assert matrix.old_accuracy()[2] == pytest.approx(62.5)


def test_forgetting_can_be_negative_when_accuracy_improves():
    matrix = AccuracyMatrix(correct=[[50], [70, 90]], total=[[100], [100, 100]])
    assert matrix.forgetting() == pytest.approx(-20.0)
    assert matrix.backward_transfer() == pytest.approx(20.0)


def test_csv_and_summary_shapes():
    matrix = AccuracyMatrix(correct=[[9], [6, 8]], total=[[10], [10, 10]])
    csv = matrix.to_csv().splitlines()
    assert csv[0] == "after_task,task_0,task_1"
    assert csv[1] == "0,90.0000,"
    assert csv[2] == "1,60.0000,80.0000"
    summary = matrix.summary()
    assert summary["num_tasks"] == 2 and summary["correct"] == [[9], [6, 8]]


@pytest.mark.parametrize(
    ("correct", "total"),
    [([[1, 2]], [[3, 3]]), ([[5]], [[4]]), ([[1]], [[0]]), ([[1]], [[1], [1, 1]])],
)
def test_impossible_matrices_are_rejected(correct, total):
    with pytest.raises(ValueError):
        AccuracyMatrix(correct=correct, total=total)


def test_mtil_transfer_avg_last_on_a_hand_made_four_task_matrix():
    # 100 test images per dataset, so counts read as percentages. Z is the zero-shot row (before task 0).
    # R[j][i] after training task j:
    #        i=0  i=1  i=2  i=3
    # Z       50   40   30   20
    # j=0     90   44   32   21
    # j=1     80   85   34   23
    # j=2     70   75   95   25
    # j=3     60   65   85   99
    rows = [[90, 44, 32, 21], [80, 85, 34, 23], [70, 75, 95, 25], [60, 65, 85, 99]]
    matrix = AccuracyMatrix(rows, [[100] * 4] * 4, [50, 40, 30, 20], [100] * 4)
    # Transfer: i=1: 44; i=2: (32 + 34) / 2 = 33; i=3: (21 + 23 + 25) / 3 = 23 -> (44 + 33 + 23) / 3
    assert matrix.transfer_per_task() == [None, pytest.approx(44.0), pytest.approx(33.0), pytest.approx(23.0)]
    assert matrix.transfer() == pytest.approx(100 / 3)
    # Avg: column means (90+80+70+60)/4 = 75, (44+85+75+65)/4 = 67.25, (32+34+95+85)/4 = 61.5, (21+23+25+99)/4 = 42
    assert matrix.average_per_task() == [pytest.approx(v) for v in (75.0, 67.25, 61.5, 42.0)]
    assert matrix.average() == pytest.approx((75 + 67.25 + 61.5 + 42) / 4)
    # Last: (60 + 65 + 85 + 99) / 4
    assert matrix.last() == pytest.approx(77.25)
    assert matrix.zero_shot_accuracy() == [50.0, 40.0, 30.0, 20.0]
    # The class-incremental metrics read the lower triangle: forgetting (90-60 + 85-65 + 95-85) / 3 = 20
    assert matrix.forgetting() == pytest.approx(20.0)
    assert matrix.all_seen_accuracy()[1] == pytest.approx(82.5)  # (80 + 85) / 2 on the seen tasks
    summary = matrix.summary()
    assert summary["accuracy_matrix"][0] == [90.0, 44.0, 32.0, 21.0] and summary["last"] == pytest.approx(77.25)
    assert matrix.to_csv().splitlines()[1] == "zero-shot,50.0000,40.0000,30.0000,20.0000"


def test_mtil_metrics_wait_for_the_last_row_and_need_a_full_matrix():
    partial = AccuracyMatrix([[90, 44, 32]], [[100] * 3], [50, 40, 30], [100] * 3)
    assert partial.transfer() is None and partial.last() is None and partial.matrix() == [[90.0, 44.0, 32.0]]
    triangular = AccuracyMatrix([[9], [6, 8]], [[10], [10, 10]])
    assert triangular.transfer() is None and triangular.average() is None and triangular.last() is None
    with pytest.raises(ValueError):
        AccuracyMatrix([[1, 2]], [[2, 2]], [1, 1, 1], [2, 2, 2])  # rows must cover the zero-shot row's tasks
