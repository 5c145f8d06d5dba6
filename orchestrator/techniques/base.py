"""The technique interface (v2): hooks with no-op defaults, decisions as values, declared
capabilities, a read-only :class:`TrainState` that takes requests, a :class:`Context`.

A technique is a class implementing these hooks, built from its config (a
``TechniqueConfig`` listed in :mod:`orchestrator.recipe.catalog`) by its module's ``SPEC``
(:mod:`orchestrator.techniques.registry`). Hooks default to no-ops; techniques never
inherit from one another. What a technique does beyond the always-called hooks is declared
in ``capabilities`` (the conformance test checks the declaration against the hooks it
overrides).

Hook order::

    bind(ctx) -> wrap_batches(batches, ctx) -> [load_state_dict on resume] -> configure(setup)
    -> on_checkpoint_loaded -> on_train_start
    per step: on_step_begin -> (forward/backward per micro-batch) -> on_before_optimizer_step
      -> [Decision agreed] -> optimizer step or skip -> on_step_end -> [Decision agreed]
      -> ROLLBACK: restore, on_rollback / STOP: on_error ... (on_checkpoint_saved after saves)
    on_train_end (a finished run) | on_error(state, exc) (a failed one) -> close() (always)

Techniques read ``state``'s facts and change the run only through its request methods
(``set_lr``, ``set_lr_scale``, ``request_rebuild``, ``mark_regime_change``, ``record``,
``emit``); the loop applies them. Rollback and stop are :class:`Decision` values returned
by the verdict hooks, never flags.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, Protocol

from orchestrator.recipe.sections import TechniqueConfig as TechniqueConfig

if TYPE_CHECKING:
    import torch

    from orchestrator.recipe.schema import Recipe

Reduce = Literal["mean", "sum", "max"] | None


class Action(IntEnum):
    """What a decision asks for, ordered: the loop takes the max over techniques and ranks."""

    PROCEED = 0
    SKIP_STEP = 1
    ROLLBACK = 2
    STOP = 3


@dataclass(frozen=True)
class Decision:
    """A verdict hook's answer. Build one with the class methods; ``PROCEED`` is the default.

    ``to_step``: a rollback restores the newest checkpoint at or before it (None: the newest).
    ``skip``: stream ranges ``[start, end)`` skipped after the restore. ``reset_moments``:
    zero the optimizer moments. ``reason``: why (goes into the rollback event and lineage).
    ``message``: for STOP, the error the job fails with. ``retry``: for SKIP_STEP, the step's
    batch is drawn again by the next step (the cursor does not move on): a transient fault.
    ``bad_rank``: for STOP, the rank whose hardware the technique suspects (the same answer
    on every rank); the driver may restart the job without that rank's node.
    """

    action: Action = Action.PROCEED
    to_step: int | None = None
    skip: tuple[tuple[int, int], ...] = ()
    reset_moments: bool = False
    reason: Mapping[str, Any] = field(default_factory=dict)
    message: str = ""
    retry: bool = False
    bad_rank: int | None = None

    @classmethod
    def proceed(cls) -> Decision:
        """Carry on."""
        return cls()

    @classmethod
    def skip_step(cls, reason: Mapping[str, Any] | None = None) -> Decision:
        """Skip this step's optimizer update (no weight or moment change)."""
        return cls(Action.SKIP_STEP, reason=dict(reason or {}))

    @classmethod
    def retry_step(cls, reason: Mapping[str, Any] | None = None) -> Decision:
        """Skip this step's update and run its batch again at the next step (a fault that
        did not reproduce: the data is fine, the step is not lost)."""
        return cls(Action.SKIP_STEP, reason=dict(reason or {}), retry=True)

    @classmethod
    def rollback(
        cls,
        to_step: int | None = None,
        skip: Iterable[tuple[int, int]] = (),
        reset_moments: bool = False,
        reason: Mapping[str, Any] | None = None,
    ) -> Decision:
        """Restore the checkpoint at or before ``to_step`` in place, then skip ``skip``."""
        ranges = tuple(sorted({(int(a), int(b)) for a, b in skip if b > a}))
        return cls(Action.ROLLBACK, to_step, ranges, reset_moments, dict(reason or {}))

    @classmethod
    def stop(
        cls, message: str, reason: Mapping[str, Any] | None = None, bad_rank: int | None = None
    ) -> Decision:
        """End the job deliberately (a restart must not retry it). With ``bad_rank``: the
        cause is that rank's hardware, so a restart without its node may go on."""
        return cls(Action.STOP, reason=dict(reason or {}), message=message, bad_rank=bad_rank)


def combine(decisions: Iterable[Decision]) -> Decision:
    """One decision from several (technique order): the highest action wins.

    Rollbacks merge: the earliest ``to_step`` (None is the newest checkpoint, the latest
    bound), the union of the skip ranges, ``reset_moments`` if any asks, the reasons merged
    with the earlier technique's keys winning. Stops join their messages and keep the first
    suspect rank. Skips retry the batch if any asks (a skipped batch is not lost by drawing
    it again).
    """
    top = [d for d in decisions if d.action > Action.PROCEED]
    if not top:
        return Decision()
    action = max(d.action for d in top)
    same = [d for d in top if d.action == action]
    if len(same) == 1:
        return same[0]
    bounds = [d.to_step for d in same if d.to_step is not None]
    reason: dict[str, Any] = {}
    for d in reversed(same):
        reason.update(d.reason)
    return Decision(
        action,
        to_step=min(bounds) if bounds else None,
        skip=tuple(sorted({r for d in same for r in d.skip})),
        reset_moments=any(d.reset_moments for d in same),
        reason=reason,
        message="; ".join(d.message for d in same if d.message),
        retry=action == Action.SKIP_STEP and any(d.retry for d in same),
        bad_rank=next((d.bad_rank for d in same if d.bad_rank is not None), None),
    )


class Capability(Enum):
    """What a technique does beyond the hooks every technique gets (declared, not probed)."""

    DECIDES_BEFORE_STEP = "decides_before_step"  # on_before_optimizer_step may skip/roll back/stop
    DECIDES_AFTER_STEP = "decides_after_step"  # on_step_end may skip/roll back/stop
    GUARDS_ROLLBACK = "guards_rollback"  # rollback_floor: retention keeps checkpoints from it
    KEEPS_STATE_ON_ROLLBACK = "keeps_state_on_rollback"  # its state is not restored on rollback
    CONFIGURES = "configures"  # configure: param groups, optimizer wrappers, model, ds config
    SUPPLIES_DATA = "supplies_data"  # wrap_batches: supplies or wraps the batch stream
    SUMMARIZES = "summarizes"  # summary: adds to the run summary


# The hook each capability stands for (the conformance test checks declaration == override).
CAPABILITY_HOOKS: dict[Capability, str] = {
    Capability.DECIDES_BEFORE_STEP: "on_before_optimizer_step",
    Capability.DECIDES_AFTER_STEP: "on_step_end",
    Capability.GUARDS_ROLLBACK: "rollback_floor",
    Capability.CONFIGURES: "configure",
    Capability.SUPPLIES_DATA: "wrap_batches",
    Capability.SUMMARIZES: "summary",
}


@dataclass
class Setup:
    """What a technique may change before ``deepspeed.initialize``.

    ``param_groups`` are handed to the optimizer as-is: a technique may split
    them (one group per layer), drop frozen parameters, or add keys such as
    ``lr_multiplier`` (the loop multiplies the scheduled LR by it).
    ``ds_config`` is the DeepSpeed config about to be used.
    """

    recipe: Recipe
    model: torch.nn.Module
    param_groups: list[dict[str, Any]]
    ds_config: dict[str, Any]
    rank: int
    world_size: int
    wrap_optimizer: list[Callable[[Any], Any]] = field(default_factory=list)


class BatchStream(Protocol):
    """What the loop draws micro-batches from (``engine.data.BatchSource`` is one)."""

    def micro_batch_at(self, cursor: int, micro: int) -> dict[str, Any]:
        """Micro-batch ``micro`` of the global batch that starts at stream position ``cursor``."""
        ...


_FACTS = ("step", "lr", "lr_scale", "loss", "grad_norm", "cursor", "regime_change")


class TrainState:
    """The loop's state as techniques see it: facts to read, requests to make.

    Facts: ``step`` (optimizer steps completed), ``total_steps``, ``rank``, ``world_size``,
    ``lr`` (the scheduled LR of the step about to run; the loop applies
    ``lr * lr_scale * group['lr_multiplier']``), ``lr_scale``, ``loss``, ``grad_norm``,
    ``cursor`` (stream position of the step's first sample), ``run_dir``, ``recipe``,
    ``regime_change`` (this step changes the statistics on purpose, e.g. a continual stage
    switch: detectors restart them), ``regime_signals`` (which: ``loss``, ``grad_norm``) and
    ``metrics`` (what was recorded
    this step so far, read-only). Assigning to any of them raises: use the requests.
    """

    recipe: Recipe
    total_steps: int
    rank: int
    world_size: int
    run_dir: str | None
    step: int
    lr: float
    lr_scale: float
    loss: float
    grad_norm: float
    cursor: int
    regime_change: bool
    regime_signals: frozenset[str]
    _on_event: Callable[[str, dict[str, Any]], None] | None
    _metrics: dict[str, tuple[float, Reduce]]
    _rebuild: bool

    def __init__(
        self,
        recipe: Recipe,
        total_steps: int,
        rank: int = 0,
        world_size: int = 1,
        step: int = 0,
        lr: float = 0.0,
        run_dir: str | None = None,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
    ):
        d = self.__dict__
        d.update(recipe=recipe, total_steps=total_steps, rank=rank, world_size=world_size)
        d.update(run_dir=run_dir, step=step, lr=lr, lr_scale=1.0, cursor=0, regime_change=False)
        d.update(loss=float("nan"), grad_norm=float("nan"), regime_signals=frozenset())
        d["_on_event"] = on_event
        d["_metrics"] = {}  # name -> (value, reduce) recorded this step
        d["_rebuild"] = False

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(
            f"TrainState.{name} is read-only for techniques: use a request "
            "(set_lr, set_lr_scale, request_rebuild, mark_regime_change, record, emit)"
        )

    # -- requests (techniques) -----------------------------------------------------------------
    def set_lr(self, lr: float) -> None:
        """The scheduled LR of the step about to run (later techniques see it)."""
        self.__dict__["lr"] = float(lr)

    def set_lr_scale(self, scale: float) -> None:
        """A factor on the scheduled LR until changed again (saved in checkpoints)."""
        self.__dict__["lr_scale"] = float(scale)

    def request_rebuild(self) -> None:
        """Rebuild the DeepSpeed engine (``configure`` runs again) before the next update."""
        self.__dict__["_rebuild"] = True

    def mark_regime_change(self, signals: Iterable[str] = ("loss", "grad_norm")) -> None:
        """This step changes the statistics of ``signals`` on purpose (for this step only):
        a new data distribution changes both; a new set of trained parameters (a LISA
        switch) changes the gradient norm only."""
        known = {"loss", "grad_norm"}
        unknown = set(signals) - known
        if unknown:
            raise ValueError(f"mark_regime_change: unknown signals {sorted(unknown)}")
        self.__dict__["regime_change"] = True
        self.__dict__["regime_signals"] = self.regime_signals | frozenset(signals)

    def record(self, name: str, value: float, reduce: Reduce = None) -> None:
        """A metric of this step. ``reduce`` (mean/sum/max) agrees it across ranks (record it
        on every rank then); None logs this rank's value (rank 0's reaches MLflow)."""
        if reduce not in (None, "mean", "sum", "max"):
            raise ValueError(f"record({name!r}): reduce must be mean, sum, max or None")
        self._metrics[name] = (float(value), reduce)

    def emit(self, kind: str, **payload: Any) -> None:
        """An event (spike, switch, ...) in the run's event log, at the current step."""
        if self._on_event is not None:
            self._on_event(kind, payload)

    @property
    def metrics(self) -> Mapping[str, float]:
        """What was recorded this step so far (this rank's values)."""
        return MappingProxyType({k: v for k, (v, _) in self._metrics.items()})

    # -- the loop's side ------------------------------------------------------------------------
    def _update(self, **facts: Any) -> None:
        """Set facts (the loop only)."""
        unknown = set(facts) - set(_FACTS)
        if unknown:
            raise AttributeError(f"not a TrainState fact: {sorted(unknown)}")
        self.__dict__.update(facts)

    def _begin_step(self) -> None:
        self.__dict__.update(regime_change=False, regime_signals=frozenset(), _metrics={})

    def _take_rebuild(self) -> bool:
        wanted, self.__dict__["_rebuild"] = self._rebuild, False
        return bool(wanted)

    def _take_metrics(self) -> dict[str, tuple[float, Reduce]]:
        out, self.__dict__["_metrics"] = self._metrics, {}
        return out


@dataclass(frozen=True)
class Replay:
    """This rank's values of a step and of its re-run on the same batch and weights."""

    first_loss: float  # the step's own loss on this rank (before the all-reduce)
    loss: float  # the re-run's loss on this rank
    grad_sq: float  # the re-run's squared gradient norm on this rank
    seconds: float  # what the re-run took


@dataclass
class Context:
    """The live objects of a job, handed to :meth:`Technique.bind` once the model exists.

    ``engine`` is the current DeepSpeed engine (None before it is built; a new object after
    a rebuild): read it when needed, do not keep it. ``task`` computes losses and eval
    scores; ``data`` is the job's :class:`~orchestrator.data.Split`. ``replay()`` re-runs the
    step in progress (between backward and the update) on the same batch from the same
    weights, without touching the gradients about to be applied: this rank's values.
    """

    recipe: Recipe
    state: TrainState
    model: torch.nn.Module
    task: Any
    data: Any
    rank: int = 0
    world_size: int = 1
    engine_of: Callable[[], Any] = lambda: None
    replay: Callable[[], Replay] | None = None

    @property
    def engine(self) -> Any:
        """The engine in use now."""
        return self.engine_of()


class Technique:
    """No-op defaults for every hook; a technique overrides only what it needs and declares
    the matching :class:`Capability` in ``capabilities``."""

    name: str = "technique"
    capabilities: frozenset[Capability] = frozenset()

    def bind(self, ctx: Context) -> None:
        """Once the model, task and data exist, before anything else: keep what it needs."""

    def wrap_batches(self, batches: BatchStream, ctx: Context) -> BatchStream:
        """SUPPLIES_DATA: return the stream the loop draws from (wrap or replace ``batches``)."""
        return batches

    def configure(self, setup: Setup) -> None:
        """CONFIGURES: before ``deepspeed.initialize`` (and again on every engine rebuild)."""

    def on_train_start(self, state: TrainState) -> None:
        """Once the engine exists, before the first step (also after a resume)."""

    def on_step_begin(self, state: TrainState) -> None:
        """Before the first micro-batch of a step: set LR, rates, active layers."""

    def on_before_optimizer_step(self, state: TrainState) -> Decision:
        """After backward of the last micro-batch, before the optimizer updates.
        Only a DECIDES_BEFORE_STEP technique may return anything but PROCEED."""
        return Decision()

    def on_step_end(self, state: TrainState, metrics: Mapping[str, float]) -> Decision:
        """After the optimizer step (or its skip); ``metrics`` are the step's so far.
        Only a DECIDES_AFTER_STEP technique may return anything but PROCEED."""
        return Decision()

    def rollback_floor(self, step: int) -> int | None:
        """GUARDS_ROLLBACK: the earliest step a rollback decided at ``step`` may return to;
        checkpoint retention keeps the newest checkpoint at or before it and all after."""
        return None

    def on_rollback(self, state: TrainState, step: int) -> None:
        """After the loop restored the checkpoint of ``step`` in place."""

    def on_checkpoint_saved(self, state: TrainState, step: int, path: str) -> None:
        """After the checkpoint of ``step`` was written (or, async, handed to the writer)."""

    def on_checkpoint_loaded(self, state: TrainState, step: int) -> None:
        """After a resume or a rollback loaded the checkpoint of ``step``."""

    def on_train_end(self, state: TrainState) -> None:
        """After the last step (a finished run only)."""

    def on_error(self, state: TrainState, exc: BaseException) -> None:
        """The run fails with ``exc`` (a raised step, a STOP decision)."""

    def close(self) -> None:
        """Always, last: release what the technique holds (hooks, files, threads)."""

    def summary(self) -> dict[str, Any]:
        """SUMMARIZES: keys merged into the run summary (``summary.json``, ``train()``'s value)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly as an uninterrupted run would."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (unless KEEPS_STATE_ON_ROLLBACK, also on
        a rollback)."""


def overrides(technique: Technique, hook: str) -> bool:
    """Whether ``technique``'s class overrides ``hook`` of :class:`Technique`."""
    return getattr(type(technique), hook, None) is not getattr(Technique, hook)


def has(technique: Technique, capability: Capability) -> bool:
    """Whether ``technique`` declares ``capability``."""
    return capability in technique.capabilities
