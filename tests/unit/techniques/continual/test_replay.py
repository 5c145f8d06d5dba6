"""Replay buffer: reservoir is uniform, balanced policies balance, state resumes bit-for-bit."""

from __future__ import annotations

import io

import pytest
import torch

from orchestrator.techniques.continual.replay import ReplayBuffer, draw_generator, replay_count


def _chi2(counts: list[int]) -> float:
    expected = sum(counts) / len(counts)
    return sum((c - expected) ** 2 / expected for c in counts)


def test_reservoir_keeps_a_uniform_sample_of_the_whole_stream():
    """1,000 items into 100 slots, 60 seeds: inclusions per tenth of the stream are uniform
    (chi-square, 9 dof, 1% critical value 21.67); keeping the first or last items fails it."""
    bins = [0] * 10
    for seed in range(60):
        buf = ReplayBuffer(100, "reservoir", seed=seed)
        for i in range(1000):
            buf.add(0, i)
        assert len(buf) == 100 and buf.seen == 1000
        for index in buf.index:
            bins[index // 100] += 1
    assert _chi2(bins) < 21.67, bins
    assert _chi2([6000] + [0] * 9) > 21.67  # the statistic does reject a first-items buffer


def test_reservoir_inclusion_probability_of_one_item_is_size_over_seen():
    """Binomial check on the very first item: kept with probability 20/200 = 0.1."""
    kept = 0
    runs = 400
    for seed in range(runs):
        buf = ReplayBuffer(20, "reservoir", seed=seed)
        for i in range(200):
            buf.add(0, i)
        kept += 0 in buf.index
    # mean 40, sd = sqrt(400 * 0.1 * 0.9) = 6: within 3.5 sd
    assert abs(kept - 40) < 21, kept


def test_class_balanced_evens_out_a_class_incremental_stream():
    buf = ReplayBuffer(90, "class_balanced", seed=1)
    for label in range(3):  # 500 of class 0, then 500 of class 1, then 500 of class 2
        for i in range(500):
            buf.add(label, label * 500 + i, label)
    assert buf.counts() == {0: 30, 1: 30, 2: 30}
    assert all(buf.label[s] == buf.index[s] // 500 for s in range(90))  # labels kept with ids


def test_class_balanced_under_an_imbalanced_interleaved_stream():
    gen = torch.Generator().manual_seed(0)
    buf = ReplayBuffer(60, "class_balanced", seed=2)
    labels = torch.multinomial(torch.tensor([0.8, 0.1, 0.1]), 3000, True, generator=gen)
    for i, label in enumerate(labels.tolist()):
        buf.add(0, i, label)
    assert buf.counts() == {0: 20, 1: 20, 2: 20}
    reservoir = ReplayBuffer(60, "reservoir", seed=2)
    for i, label in enumerate(labels.tolist()):
        reservoir.add(0, i, label)
    majority = sum(1 for lab in reservoir.label if lab == 0)
    assert majority > 40  # plain reservoir follows the stream's imbalance


def test_task_balanced_keys_by_task():
    buf = ReplayBuffer(40, "task_balanced", seed=0)
    for task, n in ((0, 300), (1, 50), (2, 900), (3, 20)):
        for i in range(n):
            buf.add(task, i, label=i % 10)
    assert buf.counts() == {0: 10, 1: 10, 2: 10, 3: 10}


@pytest.mark.parametrize("policy", ["reservoir", "class_balanced", "task_balanced"])
def test_state_dict_round_trip_continues_the_same_stream(policy):
    def feed(buf: ReplayBuffer, start: int, stop: int) -> None:
        for i in range(start, stop):
            buf.add(i // 300, i, label=(i * 7) % 5)

    straight = ReplayBuffer(50, policy, seed=3)
    feed(straight, 0, 1200)
    first = ReplayBuffer(50, policy, seed=3)
    feed(first, 0, 600)
    blob = io.BytesIO()
    torch.save(first.state_dict(), blob)  # as checkpoints store it
    blob.seek(0)
    resumed = ReplayBuffer(50, policy, seed=3)
    resumed.load_state_dict(torch.load(blob, weights_only=True))
    feed(resumed, 600, 1200)
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in ("task", "index", "label", "rng"))
    assert a["seen"] == b["seen"] and a["seen_by_key"] == b["seen_by_key"]
    drifted = ReplayBuffer(50, policy, seed=4)  # a different seed is a different stream
    feed(drifted, 0, 1200)
    assert policy != "reservoir" or drifted.index != straight.index


def test_load_rejects_a_different_config():
    with pytest.raises(ValueError, match="same replay config"):
        ReplayBuffer(10, "reservoir").load_state_dict(ReplayBuffer(20, "reservoir").state_dict())


def test_replay_count_and_draws():
    assert replay_count(0.25, 16, buffered=0) == 0  # nothing to replay yet
    assert [replay_count(r, 16, 5) for r in (0.0, 0.25, 0.5, 0.3)] == [0, 4, 8, 5]
    assert replay_count(0.99, 4, 5) == 3  # at least one fresh sample
    buf = ReplayBuffer(10, "reservoir")
    for i in range(10):
        buf.add(1, i)
    picks = buf.draw(6, draw_generator(0, 5, 0, 0))
    assert len(picks) == 6 and len(set(picks)) == 6  # without replacement when it fits
    assert picks == buf.draw(6, draw_generator(0, 5, 0, 0))  # a pure function of coordinates
    assert picks != buf.draw(6, draw_generator(0, 5, 1, 0))  # other ranks draw differently
    assert len(buf.draw(15, draw_generator(0, 5, 0, 0))) == 15  # with replacement past len
