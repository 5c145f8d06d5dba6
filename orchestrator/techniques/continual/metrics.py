"""Continual-evaluation metrics over a per-task accuracy table (De Lange et al., ICLR 2023).

The table holds ``A(E_i, f_n)``: the score of task ``i`` evaluated after step ``n`` (a
step count, not an index). ``ends[i]`` is ``|T_i|``, the last step of task ``i``; ``T``
tasks, ``t`` the last evaluated step. With ``k`` the task being (or last) trained:

* per-task min-ACC of task ``i < k``: ``min_n A(E_i, f_n)`` over ``|T_i| < n <= t``
  (the worst the task got after it was learned).
* average min-ACC: ``1/(k-1) * sum_{i<k}`` of those.
* WC-ACC: ``(1/k) * A(E_k, f_t) + (1 - 1/k) * min-ACC``.
* windowed forgetting ``WF^w``: per task ``i < k``, the largest drop
  ``A(E_i, f_m) - A(E_i, f_n)`` over ``|T_i| <= m < n <= t`` with ``n - m < w`` (both in one
  window of ``w`` consecutive steps; 0 if the score never drops), averaged over ``i < k``.
  With evaluations sparser than the window it is undefined (None).
* final average accuracy: ``1/T * sum_i A(E_i, f_t)``.
* BWT: ``1/(T-1) * sum_{i<T} (A(E_i, f_t) - A(E_i, f_{|T_i|}))`` (negative = forgetting).

For language models the score is the loss, where lower is better: the same formulas run
on ``-loss`` and the results are reported as losses (``avg_max_loss``, ``wc_loss``,
``final_avg_loss``); ``bwt`` and ``wf*`` then mean the same thing in loss units
(``bwt`` negative / ``wf`` positive = forgetting).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

Table = Mapping[int, Mapping[int, float]]  # task -> {step: score}


def _after(series: Mapping[int, float], start: int, end: int | None = None) -> list[float]:
    return [v for n, v in sorted(series.items()) if n > start and (end is None or n <= end)]


def per_task_min(table: Table, ends: Sequence[int], upto: int) -> dict[int, float]:
    """min-ACC of each task ``i`` already finished at step ``upto``, excluding the current one."""
    out: dict[int, float] = {}
    for i, end in enumerate(ends):
        if end >= upto:
            break
        after = _after(table.get(i, {}), end, upto)
        if after:
            out[i] = min(after)
    return out


def current_task(ends: Sequence[int], step: int) -> int:
    """Index ``k`` (0-based) of the task trained at ``step`` (the last one past the end)."""
    for i, end in enumerate(ends):
        if step <= end:
            return i
    return len(ends) - 1


def average_min_acc(table: Table, ends: Sequence[int], upto: int) -> float | None:
    """Average over previous tasks of their min-ACC (None when there is no previous task)."""
    mins = per_task_min(table, ends, upto)
    return sum(mins.values()) / len(mins) if mins else None


def wc_acc(table: Table, ends: Sequence[int], upto: int) -> float | None:
    """Worst-case accuracy at ``upto``: current task's score and previous tasks' min-ACC."""
    k = current_task(ends, upto)
    current = table.get(k, {}).get(upto)
    if current is None:
        return None
    mins = per_task_min(table, ends, upto)
    if not mins:
        return current
    tasks = k + 1
    return current / tasks + (1 - 1 / tasks) * (sum(mins.values()) / len(mins))


def windowed_forgetting(table: Table, ends: Sequence[int], upto: int, window: int) -> float | None:
    """``WF^w``: mean over previous tasks of the largest drop inside any ``window`` steps."""
    drops: list[float] = []
    defined = False
    for i, end in enumerate(ends):
        if end >= upto:
            break
        points = [(n, v) for n, v in sorted(table.get(i, {}).items()) if end <= n <= upto]
        worst = 0.0
        for a, (m, am) in enumerate(points):
            for n, an in points[a + 1 :]:
                if n - m >= window:
                    break
                defined = True
                worst = max(worst, am - an)
        drops.append(worst)
    if not drops or not defined:
        return None
    return sum(drops) / len(drops)


def final_average(table: Table, n_tasks: int, upto: int) -> float | None:
    """Mean score over all tasks at step ``upto`` (None if a task lacks a value there)."""
    vals = [table.get(i, {}).get(upto) for i in range(n_tasks)]
    if any(v is None for v in vals) or not vals:
        return None
    return sum(v for v in vals if v is not None) / n_tasks


def bwt(table: Table, ends: Sequence[int], upto: int) -> float | None:
    """Backward transfer: final score minus the score at the end of its own task."""
    diffs = []
    for i, end in enumerate(ends[:-1]):
        series = table.get(i, {})
        if end in series and upto in series:
            diffs.append(series[upto] - series[end])
    return sum(diffs) / len(diffs) if diffs else None


def summarize(
    table: Table, ends: Sequence[int], upto: int, higher_is_better: bool = True
) -> dict[str, float]:
    """Every metric above at step ``upto`` as a flat dict (metrics that are undefined left out).

    Accuracy tables give ``final_avg_acc``, ``avg_min_acc``, ``wc_acc``, ``bwt``, ``wf10``,
    ``wf100`` and ``min_acc/task_i``; loss tables (``higher_is_better=False``) give
    ``final_avg_loss``, ``avg_max_loss``, ``wc_loss``, ``bwt``, ``wf10``, ``wf100`` and
    ``max_loss/task_i``.
    """
    sign = 1.0 if higher_is_better else -1.0
    scores = {t: {n: sign * v for n, v in s.items()} for t, s in table.items()}
    acc = higher_is_better
    out: dict[str, float | None] = {
        "final_avg_acc" if acc else "final_avg_loss": _signed(
            final_average(scores, len(ends), upto), sign
        ),
        "avg_min_acc" if acc else "avg_max_loss": _signed(
            average_min_acc(scores, ends, upto), sign
        ),
        "wc_acc" if acc else "wc_loss": _signed(wc_acc(scores, ends, upto), sign),
        "bwt": bwt(scores, ends, upto),
        "wf10": windowed_forgetting(scores, ends, upto, 10),
        "wf100": windowed_forgetting(scores, ends, upto, 100),
    }
    for i, v in per_task_min(scores, ends, upto).items():
        out[f"min_acc/task_{i}" if acc else f"max_loss/task_{i}"] = sign * v
    return {k: float(v) for k, v in out.items() if v is not None}


def _signed(value: float | None, sign: float) -> float | None:
    return None if value is None else sign * value
