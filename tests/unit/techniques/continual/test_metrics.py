"""Continual-evaluation metrics against values computed by hand on small tables."""

from __future__ import annotations

import pytest

from orchestrator.techniques.continual.metrics import (
    average_min_acc,
    bwt,
    per_task_min,
    summarize,
    wc_acc,
    windowed_forgetting,
)

# Three tasks ending at steps 4, 8, 12; evaluated every 2 steps on the tasks seen so far.
TABLE = {
    0: {2: 0.5, 4: 0.9, 6: 0.3, 8: 0.7, 10: 0.6, 12: 0.8},
    1: {6: 0.4, 8: 0.9, 10: 0.2, 12: 0.7},
    2: {10: 0.5, 12: 0.9},
}
ENDS = [4, 8, 12]


def test_min_acc_wc_acc_bwt_final_by_hand():
    # task 0 after step 4: min(0.3, 0.7, 0.6, 0.8) = 0.3; task 1 after step 8: min(0.2, 0.7)
    assert per_task_min(TABLE, ENDS, 12) == {0: 0.3, 1: 0.2}
    assert average_min_acc(TABLE, ENDS, 12) == pytest.approx(0.25)
    # WC-ACC = 1/3 * 0.9 + 2/3 * 0.25
    assert wc_acc(TABLE, ENDS, 12) == pytest.approx(0.3 + 0.5 / 3)
    # BWT = ((0.8 - 0.9) + (0.7 - 0.9)) / 2
    assert bwt(TABLE, ENDS, 12) == pytest.approx(-0.15)
    out = summarize(TABLE, ENDS, 12)
    assert out["final_avg_acc"] == pytest.approx(0.8)
    assert out["avg_min_acc"] == pytest.approx(0.25) and out["bwt"] == pytest.approx(-0.15)
    assert out["min_acc/task_0"] == pytest.approx(0.3)
    # WF: task 0 drops 0.9 -> 0.3 (0.6), task 1 drops 0.9 -> 0.2 (0.7) inside 10 steps
    assert out["wf10"] == pytest.approx(0.65) and out["wf100"] == pytest.approx(0.65)


def test_mid_run_metrics_use_only_what_was_seen():
    # at step 8 (end of task 1): only task 0 is a previous task; min over steps 6, 8
    assert average_min_acc(TABLE, ENDS, 8) == pytest.approx(0.3)
    assert wc_acc(TABLE, ENDS, 8) == pytest.approx(0.9 / 2 + 0.3 / 2)
    assert average_min_acc(TABLE, ENDS, 4) is None  # first task: nothing to forget yet


def test_windowed_forgetting_depends_on_the_window():
    table = {0: {4: 0.9, 6: 0.8, 8: 0.7, 10: 0.6}, 1: {6: 0.5, 8: 0.6, 10: 0.7}}
    ends = [4, 10]
    assert windowed_forgetting(table, ends, 10, 3) == pytest.approx(0.1)  # adjacent evals
    assert windowed_forgetting(table, ends, 10, 5) == pytest.approx(0.2)  # 4 steps apart
    assert windowed_forgetting(table, ends, 10, 10) == pytest.approx(0.3)
    assert windowed_forgetting(table, ends, 10, 2) is None  # evals sparser than the window
    rising = {0: {4: 0.5, 6: 0.6, 8: 0.9}, 1: {8: 0.1}}
    assert windowed_forgetting(rising, [4, 8], 8, 10) == 0.0  # no drop, no forgetting


def test_loss_tables_report_worst_case_losses():
    out = summarize(TABLE, ENDS, 12, higher_is_better=False)
    # worst loss after learning: task 0 max(0.3, 0.7, 0.6, 0.8); task 1 max(0.2, 0.7)
    assert out["avg_max_loss"] == pytest.approx(0.75)
    assert out["max_loss/task_1"] == pytest.approx(0.7)
    assert out["final_avg_loss"] == pytest.approx(0.8)
    # BWT on -loss: (0.9 - 0.8 + 0.9 - 0.7) / 2 > 0: the losses fell (no forgetting)
    assert out["bwt"] == pytest.approx(0.15)
    # largest loss rise inside 10 steps: task 0 0.3 -> 0.8, task 1 0.2 -> 0.7
    assert out["wf10"] == pytest.approx(0.5)
    # WC loss = 1/3 * 0.9 + 2/3 * 0.75
    assert out["wc_loss"] == pytest.approx(0.3 + 0.5)
    assert "avg_min_acc" not in out
