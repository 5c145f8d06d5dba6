"""The replay buffer: sample *indices* (task, index into that task's dataset), never tensors.

Every rank feeds the buffer the same stream of global sample ids in the same order and
draws its decisions from the same seeded ``torch.Generator``, so the buffers are
identical on every rank without any communication. ``state_dict`` holds the contents,
the per-key seen counters and the generator state: a restored buffer continues the
exact same stream.

Policies:

* ``reservoir``: Vitter's algorithm R, a uniform sample over everything seen so far.
* ``class_balanced`` / ``task_balanced``: class-balanced reservoir sampling (CBRS,
  Chrysakis & Moens 2020) keyed by the label or by the task: while not full, keep all;
  when full, a sample of a key that is not among the largest in the buffer replaces a
  random slot of one of the largest keys; a sample of a largest key replaces a random
  slot of its own key with probability ``kept_k / seen_k`` (uniform within the key).

Mixing: :func:`replay_count` is the number of buffer samples in each micro-batch,
exactly ``round(ratio * micro_batch)`` once the buffer is non-empty; :meth:`ReplayBuffer.draw`
picks them with a generator seeded by (seed, step, rank, micro), so draws need no state.
"""

from __future__ import annotations

import bisect
from typing import Any, Literal

import torch

Policy = Literal["reservoir", "class_balanced", "task_balanced"]


def replay_count(ratio: float, micro_batch: int, buffered: int) -> int:
    """Replay samples per micro-batch: ``round(ratio * micro_batch)``, 0 while the buffer is
    empty, and always leaving at least one fresh sample."""
    if buffered == 0 or ratio <= 0.0:
        return 0
    return min(micro_batch - 1, round(ratio * micro_batch))


def draw_generator(seed: int, step: int, rank: int, micro: int) -> torch.Generator:
    """The generator of one micro-batch's replay draw: a pure function of its coordinates."""
    mixed = ((seed * 1_000_003 + step) * 65_537 + rank) * 257 + micro
    return torch.Generator().manual_seed(mixed % (2**63 - 1))


class ReplayBuffer:
    """A fixed-size buffer of ``(task, index, label)`` triples; ``label`` is -1 when unknown."""

    def __init__(self, size: int, policy: Policy = "reservoir", seed: int = 0):
        if size < 0:
            raise ValueError(f"replay size must be >= 0, got {size}")
        self.size = size
        self.policy: Policy = policy
        self.gen = torch.Generator().manual_seed(seed * 7_919 + 17)
        self.task: list[int] = []
        self.index: list[int] = []
        self.label: list[int] = []
        self.seen = 0
        self.seen_by_key: dict[int, int] = {}
        self._slots: dict[int, list[int]] = {}  # key -> sorted slots (derived)

    def __len__(self) -> int:
        return len(self.index)

    def _key(self, task: int, label: int) -> int:
        return label if self.policy == "class_balanced" else task

    def _rand_below(self, n: int) -> int:
        return int(torch.randint(n, (1,), generator=self.gen))

    def _put(self, slot: int, task: int, index: int, label: int) -> None:
        if slot == len(self.index):
            self.task.append(task)
            self.index.append(index)
            self.label.append(label)
        else:
            old = self._key(self.task[slot], self.label[slot])
            self._slots[old].remove(slot)
            if not self._slots[old]:
                del self._slots[old]
            self.task[slot], self.index[slot], self.label[slot] = task, index, label
        bisect.insort(self._slots.setdefault(self._key(task, label), []), slot)

    def add(self, task: int, index: int, label: int = -1) -> None:
        """Offer one sample of the stream to the buffer (every rank, same order)."""
        if self.size == 0:
            self.seen += 1
            return
        key = self._key(task, label)
        self.seen += 1
        self.seen_by_key[key] = self.seen_by_key.get(key, 0) + 1
        if len(self.index) < self.size:
            self._put(len(self.index), task, index, label)
            return
        if self.policy == "reservoir":
            j = self._rand_below(self.seen)
            if j < self.size:
                self._put(j, task, index, label)
            return
        counts = {k: len(v) for k, v in self._slots.items()}
        largest = max(counts.values())
        if counts.get(key, 0) < largest:  # evict from one of the largest keys
            pool = [s for k in sorted(counts) if counts[k] == largest for s in self._slots[k]]
            self._put(pool[self._rand_below(len(pool))], task, index, label)
            return
        kept = counts[key]
        if float(torch.rand((), generator=self.gen)) * self.seen_by_key[key] < kept:
            own = self._slots[key]
            self._put(own[self._rand_below(len(own))], task, index, label)

    def draw(self, k: int, gen: torch.Generator) -> list[tuple[int, int]]:
        """``k`` buffered ``(task, index)`` pairs: without replacement when ``k <= len``."""
        n = len(self.index)
        if k <= 0 or n == 0:
            return []
        picks = (
            torch.randperm(n, generator=gen)[:k]
            if k <= n
            else torch.randint(n, (k,), generator=gen)
        )
        return [(self.task[i], self.index[i]) for i in picks.tolist()]

    def counts(self) -> dict[int, int]:
        """Buffered samples per policy key (label or task; task for reservoir)."""
        out: dict[int, int] = {}
        for t, lab in zip(self.task, self.label, strict=True):
            key = lab if self.policy == "class_balanced" else t
            out[key] = out.get(key, 0) + 1
        return dict(sorted(out.items()))

    def state_dict(self) -> dict[str, Any]:
        """Contents, counters and generator state (tensors: bit-exact through torch.save)."""
        return {
            "size": self.size,
            "policy": self.policy,
            "task": torch.tensor(self.task, dtype=torch.long),
            "index": torch.tensor(self.index, dtype=torch.long),
            "label": torch.tensor(self.label, dtype=torch.long),
            "seen": self.seen,
            "seen_by_key": {int(k): int(v) for k, v in sorted(self.seen_by_key.items())},
            "rng": self.gen.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the derived slot index is rebuilt, sorted)."""
        if int(state["size"]) != self.size or state["policy"] != self.policy:
            raise ValueError(
                f"replay buffer in the checkpoint is size {state['size']} / {state['policy']}, "
                f"the recipe asks {self.size} / {self.policy}: resume with the same replay config"
            )
        self.task = [int(x) for x in state["task"].tolist()]
        self.index = [int(x) for x in state["index"].tolist()]
        self.label = [int(x) for x in state["label"].tolist()]
        self.seen = int(state["seen"])
        self.seen_by_key = {int(k): int(v) for k, v in state["seen_by_key"].items()}
        self.gen.set_state(state["rng"])
        self._slots = {}
        for slot, (t, lab) in enumerate(zip(self.task, self.label, strict=True)):
            self._slots.setdefault(self._key(t, lab), []).append(slot)
