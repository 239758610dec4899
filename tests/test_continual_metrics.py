"""Continual metrics on hand-computed matrices: MTIL Transfer/Avg/Last, forgetting, BWT, CIL accuracy."""

from __future__ import annotations

import math

import pytest

from plugins.continual_metrics import (
    backward_transfer_per_task,
    forgetting_per_task,
    mtil_avg,
    mtil_last,
    mtil_transfer,
    step_accuracies,
    summarize_matrix,
)

NAN = float("nan")

# Row 0 is zero-shot; rows 1..3 follow tasks 1..3.
MATRIX = [
    [50.0, 60.0, 70.0],
    [80.0, 55.0, 65.0],
    [85.0, 90.0, 60.0],
    [75.0, 80.0, 95.0],
]
TRAINED = MATRIX[1:]


def test_transfer_averages_rows_before_each_task() -> None:
    # Task 2: row 1 -> 55. Task 3: rows 1 and 2 -> (65 + 60) / 2 = 62.5. Mean: 58.75.
    assert mtil_transfer(TRAINED) == pytest.approx(58.75)


def test_avg_is_mean_of_column_means() -> None:
    # Columns: (80 + 85 + 75) / 3 = 80, (55 + 90 + 80) / 3 = 75, (65 + 60 + 95) / 3 = 73.333.
    assert mtil_avg(TRAINED) == pytest.approx((80 + 75 + 220 / 3) / 3)


def test_last_is_mean_of_final_row() -> None:
    assert mtil_last(TRAINED) == pytest.approx(250 / 3)


def test_forgetting_is_max_based() -> None:
    # Task 1: max(80, 85) - 75 = 10, not 80 - 75. Task 2: 90 - 80 = 10.
    assert forgetting_per_task(TRAINED) == pytest.approx([10.0, 10.0])


def test_backward_transfer_uses_diagonal() -> None:
    # Task 1: 75 - 80 = -5. Task 2: 80 - 90 = -10.
    assert backward_transfer_per_task(TRAINED) == pytest.approx([-5.0, -10.0])


def test_summary_of_known_matrix() -> None:
    summary = summarize_matrix(MATRIX)

    assert summary["num_trained_tasks"] == 3
    assert summary["transfer"] == pytest.approx(58.75)
    assert summary["avg"] == pytest.approx((80 + 75 + 220 / 3) / 3)
    assert summary["last"] == pytest.approx(250 / 3)
    assert summary["forgetting"] == pytest.approx(10.0)
    assert summary["bwt"] == pytest.approx(-7.5)
    assert summary["zero_shot_mean"] == pytest.approx(60.0)
    assert summary["zero_shot_transfer"] == pytest.approx(65.0)


def test_constant_zero_shot_matrix_matches_published_relation() -> None:
    # Zero-shot CLIP: Transfer is the mean over tasks 2..T, Avg = Last = the mean over all tasks.
    row = [24.3, 88.4, 68.2, 44.6]
    summary = summarize_matrix([row] * 5)

    assert summary["transfer"] == pytest.approx(sum(row[1:]) / 3)
    assert summary["avg"] == pytest.approx(sum(row) / 4)
    assert summary["last"] == pytest.approx(sum(row) / 4)
    assert summary["forgetting"] == pytest.approx(0.0)
    assert summary["bwt"] == pytest.approx(0.0)


def test_mid_stream_summary_uses_rows_so_far() -> None:
    summary = summarize_matrix(MATRIX[:2])

    assert summary["num_trained_tasks"] == 1
    assert summary["transfer"] == pytest.approx((55 + 65) / 2)
    assert summary["last"] == pytest.approx(200 / 3)
    assert summary["forgetting_per_task"] == []
    assert math.isnan(summary["forgetting"])


def test_zero_shot_only_summary() -> None:
    summary = summarize_matrix(MATRIX[:1])

    assert summary["num_trained_tasks"] == 0
    assert "avg" not in summary


def test_more_rows_than_tasks_rejected() -> None:
    with pytest.raises(ValueError, match="at most T rows"):
        mtil_avg([[1.0], [2.0]])


def test_class_incremental_accuracy_weights_images() -> None:
    correct = [[3.0, NAN], [8.0, NAN], [6.0, 24.0]]
    total = [[10.0, NAN], [10.0, NAN], [10.0, 30.0]]
    matrix = [[30.0, NAN], [80.0, NAN], [60.0, 80.0]]

    summary = summarize_matrix(matrix, correct, total, task_aware=False)

    # Step 2 counts 30 of 40 images: 75, not the task mean (60 + 80) / 2 = 70.
    assert step_accuracies(correct[1:], total[1:]) == pytest.approx([80.0, 75.0])
    assert summary["avg"] == pytest.approx(77.5)
    assert summary["last"] == pytest.approx(75.0)
    assert summary["transfer"] is None
    assert summary["forgetting_per_task"] == pytest.approx([20.0])
    assert summary["bwt_per_task"] == pytest.approx([-20.0])
    assert "zero_shot_transfer" not in summary


def test_class_incremental_needs_counts() -> None:
    with pytest.raises(ValueError, match="counts"):
        summarize_matrix([[1.0, NAN], [2.0, NAN]], task_aware=False)
