"""Continual-learning metrics computed from per-task accuracies, and their Avalanche plugin metric.

The accuracy matrix ``A`` has one row per evaluation point and one column per task. Row 0 is the
model before any training (the zero-shot row); row r >= 1 follows the training of task r - 1.
The formulas below use the T trained rows only, ``R[i][j] = A[i + 1][j]`` (0-based):

- MTIL **Transfer** (ZSCL): for each task j >= 1, the mean of ``R[i][j]`` over the rows i < j
  (the tasks trained before j), then the mean over those T - 1 tasks.
- MTIL **Avg**: the mean of each column over all T rows, then over the columns.
- MTIL **Last**: the mean of the last row.
- **Forgetting** (max-based, Chaudhry et al., https://arxiv.org/abs/1801.10112), for each task
  j < T - 1: ``max(R[i][j] for j <= i < T - 1) - R[T - 1][j]``, and its mean over those tasks.
- **Backward transfer** (Lopez-Paz and Ranzato, https://arxiv.org/abs/1706.08840), for each task
  j < T - 1: ``R[T - 1][j] - R[j][j]``, and its mean.
- Class-incremental **average accuracy** is the mean over steps of the step accuracy, and **final
  accuracy** the last step accuracy. The step accuracy after step t counts every test image of
  the classes seen so far (correct over total), as the class-incremental papers do.

Entries that were not evaluated (future steps of a class-incremental stream) are NaN and are left
out of every mean. Avalanche's own stream metrics differ: ``Top1_Acc_Stream`` weights tasks by
their number of test images, and its forgetting is not max-based.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from avalanche.evaluation import PluginMetric
from avalanche.evaluation.metric_results import MetricValue

NAN = float("nan")
Matrix = Sequence[Sequence[float]]


def _mean(values: Sequence[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else NAN


def _check_shape(trained: Matrix) -> tuple[int, int]:
    """Rows and columns of a trained-rows matrix; rows may be fewer than columns mid-stream."""
    rows = len(trained)
    columns = len(trained[0]) if rows else 0
    if any(len(row) != columns for row in trained) or rows > columns:
        raise ValueError(
            f"expected at most T rows of T accuracies (trained rows only), got rows of lengths {[len(r) for r in trained]}"
        )
    return rows, columns


def mtil_transfer(trained: Matrix) -> float:
    """ZSCL's Transfer: zero-shot retention on the tasks not trained yet (NaN for T < 2).

    Mid-stream (fewer rows than tasks) each column averages the rows present before its task.
    """
    rows, columns = _check_shape(trained)
    per_task = [_mean([trained[i][j] for i in range(min(j, rows))]) for j in range(1, columns)]
    return _mean(per_task)


def mtil_avg(trained: Matrix) -> float:
    """ZSCL's Avg: column means over the trained rows, averaged over the tasks."""
    rows, columns = _check_shape(trained)
    return _mean([_mean([trained[i][j] for i in range(rows)]) for j in range(columns)])


def mtil_last(trained: Matrix) -> float:
    """ZSCL's Last: the mean accuracy of the final (latest) row."""
    _check_shape(trained)
    return _mean(list(trained[-1])) if trained else NAN


def forgetting_per_task(trained: Matrix) -> list[float]:
    """Max-based forgetting at the latest row of every task trained before it."""
    rows, _ = _check_shape(trained)
    return [max(trained[i][j] for i in range(j, rows - 1)) - trained[rows - 1][j] for j in range(rows - 1)]


def backward_transfer_per_task(trained: Matrix) -> list[float]:
    """Backward transfer ``R[last][j] - R[j][j]`` of every task trained before the latest row."""
    rows, _ = _check_shape(trained)
    return [trained[rows - 1][j] - trained[j][j] for j in range(rows - 1)]


def step_accuracies(correct: Matrix, total: Matrix) -> list[float]:
    """Accuracy in percent over every evaluated test image of each row (class-incremental)."""
    accuracies = []
    for row_correct, row_total in zip(correct, total):
        seen = [(c, t) for c, t in zip(row_correct, row_total) if not math.isnan(t) and t > 0]
        count = sum(t for _, t in seen)
        accuracies.append(100.0 * sum(c for c, _ in seen) / count if count else NAN)
    return accuracies


def summarize_matrix(matrix: Matrix, correct: Matrix | None = None, total: Matrix | None = None,
                     task_aware: bool = True) -> dict[str, Any]:
    """Compute every metric of a stream from its accuracy matrix (zero-shot row first, in percent).

    Args:
        matrix: ``(T + 1) x T`` accuracies, or fewer rows while the stream is still running.
        correct / total: counts of the same shape, needed for the class-incremental step accuracy.
        task_aware: True for streams that score each task on its own classes (MTIL metrics);
            False for class-incremental (average and final accuracy).

    Returns:
        ``avg``, ``last``, ``transfer`` (None for class-incremental), ``forgetting``, ``bwt`` and
        the per-task lists. Mid-stream they use the trained rows present so far; with all T
        rows they are exactly the definitions in the module docstring.
    """
    rows = [list(row) for row in matrix]
    trained = rows[1:]
    done = len(trained)
    result: dict[str, Any] = {"num_trained_tasks": done}
    if task_aware:
        result["zero_shot_mean"] = _mean(rows[0]) if rows else NAN
        result["zero_shot_transfer"] = _mean(rows[0][1:]) if rows else NAN
    if done == 0:
        return result
    forgetting = forgetting_per_task(trained)
    bwt = backward_transfer_per_task(trained)
    if task_aware:
        result["transfer"] = mtil_transfer(trained)
        result["avg"] = mtil_avg(trained)
        result["last"] = mtil_last(trained)
    else:
        if correct is None or total is None:
            raise ValueError("class-incremental metrics need the correct and total counts")
        steps = step_accuracies(correct[1:], total[1:])
        result["transfer"] = None
        result["step_accuracy"] = steps
        result["avg"] = _mean(steps)
        result["last"] = steps[-1]
    result["forgetting"] = _mean(forgetting)
    result["bwt"] = _mean(bwt)
    result["forgetting_per_task"] = forgetting
    result["bwt_per_task"] = bwt
    return result


class ContinualAccuracyMatrix(PluginMetric):
    """Avalanche metric that fills the accuracy matrix and logs the continual metrics.

    Every ``strategy.eval`` call is one evaluation point (one row); set :attr:`point` before it.
    For each evaluated experience it logs ``Top1_Acc_Exp/eval_phase/<stream>_stream/TaskNNN/ExpNNN``
    in percent (so Avalanche's CSV logger writes the matrix in long form), and after each point
    ``Continual/Avg``, ``Continual/Last``, ``Continual/Transfer``, ``Continual/Forgetting`` and
    ``Continual/BWT`` with the point as x value.

    Args:
        num_tasks: number of columns T.
        task_aware: see :func:`summarize_matrix`.
    """

    def __init__(self, num_tasks: int, task_aware: bool = True) -> None:
        super().__init__()
        self.num_tasks = num_tasks
        self.task_aware = task_aware
        self.point = 0
        self.correct: list[list[float]] = []
        self.total: list[list[float]] = []
        self._hits = 0
        self._count = 0

    def reset(self) -> None:
        self.correct, self.total = [], []

    def result(self) -> dict[str, Any]:
        return summarize_matrix(self.matrix(), self.correct, self.total, self.task_aware)

    def matrix(self) -> list[list[float]]:
        """Accuracies in percent, one row per evaluation point so far; NaN where not evaluated."""
        return [
            [100.0 * c / t if t > 0 else NAN for c, t in zip(row_c, row_t)]
            for row_c, row_t in zip(self.correct, self.total)
        ]

    def _row(self, point: int) -> None:
        while len(self.correct) <= point:
            self.correct.append([NAN] * self.num_tasks)
            self.total.append([NAN] * self.num_tasks)

    def before_eval(self, strategy) -> None:
        self._row(self.point)
        self.correct[self.point] = [NAN] * self.num_tasks
        self.total[self.point] = [NAN] * self.num_tasks

    def before_eval_exp(self, strategy) -> None:
        self._hits = self._count = 0

    def after_eval_iteration(self, strategy) -> None:
        self._hits += int((strategy.mb_output.argmax(dim=1) == strategy.mb_y).sum())
        self._count += int(strategy.mb_y.numel())

    def after_eval_exp(self, strategy) -> list[MetricValue]:
        column = strategy.experience.current_experience
        self.correct[self.point][column] = float(self._hits)
        self.total[self.point][column] = float(self._count)
        accuracy = 100.0 * self._hits / self._count if self._count else NAN
        stream = strategy.experience.origin_stream.name
        name = f"Top1_Acc_Exp/eval_phase/{stream}_stream/Task{column:03d}/Exp{column:03d}"
        return [MetricValue(self, name, accuracy, self.point)]

    def after_eval(self, strategy) -> list[MetricValue]:
        summary = self.result()
        names = {"avg": "Avg", "last": "Last", "transfer": "Transfer", "forgetting": "Forgetting", "bwt": "BWT"}
        values = []
        for key, label in names.items():
            value = summary.get(key)
            if isinstance(value, float) and not math.isnan(value):
                values.append(MetricValue(self, f"Continual/{label}", value, self.point))
        return values

    def __str__(self) -> str:
        return "ContinualAccuracyMatrix"
