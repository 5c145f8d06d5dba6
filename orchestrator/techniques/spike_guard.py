"""Spike guard: detect loss / gradient spikes, skip the step, roll back, skip the data, cool down.

Config lives at the recipe's top level (``stability:``). Detectors, each evaluated
before the optimizer step (so a bad step can be skipped: no update, no moment change):

* ``nan``: a NaN/Inf loss or gradient norm: anomalous at once, no history needed.
* ``loss_z`` / ``grad_z``: a one-sided robust z-score over a rolling window of healthy
  steps, ``(x - median) / (1.4826 * MAD)``; armed once ``min_history`` values exist.
* ``loss_ratio`` (optional): ``loss / median > max_loss_ratio``.
* ``loss_trend``: a slow divergence, a one-sided CUSUM of the log loss of healthy steps
  against the median of the ``trend_baseline`` steps before it began (frozen while the sum
  is above 0), in sigmas of the step-to-step noise, less ``trend_slack`` a step; above
  ``trend_threshold`` it asks for a rollback at once (skipping one step cannot undo a trend),
  to a checkpoint before the sum left 0.

The gradient norm is measured before the update from ``p.grad`` (sqrt of the mean over
ranks of each rank's squared norm: the global norm under ZeRO-0, a consistent proxy
under ZeRO-1); where DeepSpeed has already moved the gradients away (ZeRO-2) the engine's
norm of the step is checked after the step instead and can only count toward a rollback.

Escalation: every anomalous step is skipped. After ``patience`` consecutive anomalies
the guard asks for a ROLLBACK to the last *good* checkpoint: one followed by at least
``good_after`` healthy steps (the loop restores the newest checkpoint at or before
the decision's ``to_step``). The stream positions of ``skip_batches`` global batches from
the spike onset are skipped (the decision's ``skip``); the LR is scaled by ``lr_scale``
for ``cooldown_steps`` steps; ``reset_moments`` zeroes the optimizer moments. After
``max_rollbacks`` rollbacks the next one becomes STOP with a message naming every
spike and what was tried. The guard's counters are not rolled back
(``KEEPS_STATE_ON_ROLLBACK``) and are all in its ``state_dict``.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from orchestrator.distributed import all_gather_objects, all_reduce_
from orchestrator.recipe import catalog
from orchestrator.recipe.techniques.stability import StabilityConfig
from orchestrator.techniques.base import (
    Capability,
    Context,
    Decision,
    Replay,
    Setup,
    Technique,
    TrainState,
)
from orchestrator.techniques.indicators import IndicatorProbe
from orchestrator.techniques.registry import TechniqueSpec

MAD_TO_SIGMA = 1.4826
SIGNALS = ("loss", "grad_norm")  # the statistics a regime change may restart
MAX_SNAPSHOTS = 16  # checkpoints whose statistics a rollback can restore (older: re-arm)
# least step-to-step noise of the log loss the trend assumes: a loss flat to 0.1 % a step
# (full-batch, deterministic) must not turn a 0.05 % uptick into hundreds of sigmas
TREND_MIN_SIGMA = 1e-3


def robust_z(value: float, history: list[float], floor: float = 0.0) -> float:
    """One-sided robust z-score of ``value`` against ``history`` (median / MAD); the scale
    is at least ``floor``."""
    t = torch.tensor(history, dtype=torch.float64)
    med = float(t.median())
    mad = float((t - med).abs().median())
    scale = max(MAD_TO_SIGMA * mad, floor)
    if scale <= 1e-12 * max(1.0, abs(med)):
        scale = 1e-6 * max(1.0, abs(med))  # flat history: any real jump is a spike
    return (value - med) / scale


def _log(value: float) -> float:
    return math.log(max(value, 1e-30))


def noise_sigma(history: list[float]) -> float:
    """Step-to-step noise of a series, blind to its (slow) trend: 1.4826 x the median
    absolute first difference, over sqrt(2) (a difference holds two steps' noise)."""
    t = torch.tensor(history, dtype=torch.float64)
    return MAD_TO_SIGMA * float((t[1:] - t[:-1]).abs().median()) / math.sqrt(2.0)


def _pre_step_grad_norm(model: torch.nn.Module | None, world_size: int) -> float | None:
    """Norm of the gradients about to be applied, agreed across ranks; None if none are held."""
    if model is None:
        return None
    sq = torch.zeros((), dtype=torch.float64)
    found = False
    for p in model.parameters():
        if p.grad is not None:
            found = True
            sq += p.grad.detach().double().pow(2).sum()
    flag = all_reduce_(torch.tensor([sq.item(), float(found)], dtype=torch.float64))
    if flag[1] < world_size:  # some rank holds no gradients (ZeRO-2): not measurable here
        return None
    return math.sqrt(flag[0].item() / world_size) if math.isfinite(flag[0].item()) else math.inf


class SpikeGuard(Technique):
    """Detects spikes and escalates: skip step, roll back with a data skip, stop."""

    name = "spike_guard"
    capabilities = frozenset(
        {
            Capability.CONFIGURES,
            Capability.DECIDES_BEFORE_STEP,
            Capability.DECIDES_AFTER_STEP,
            Capability.GUARDS_ROLLBACK,
            Capability.KEEPS_STATE_ON_ROLLBACK,
        }
    )

    def __init__(self, cfg: StabilityConfig, global_batch: int):
        self.cfg = cfg
        self.global_batch = global_batch
        self.loss_hist: list[float] = []
        self.grad_hist: list[float] = []
        self.anomaly_steps: list[int] = []
        self.streak = 0
        self.onset: list[int] | None = None  # [step, cursor] of the current streak's first anomaly
        self.reason: dict[str, Any] = {}
        self.rollbacks: list[dict[str, Any]] = []
        self.cooldown_until = -1
        self.anomalies = 0
        self._pending: float | None = None  # grad norm measured before the step
        self._scores: dict[str, float] = {}
        self.warnings: list[list[Any]] = []  # [step, indicator, value] of indicator warnings
        self.probe = IndicatorProbe() if cfg.indicators_every else None
        self._told_unavailable = False
        self._model: torch.nn.Module | None = None
        # the detector statistics as they were at each checkpoint (step -> histories): a
        # rollback takes them back with the model, a resume gets them from the checkpoint
        self.snapshots: dict[int, dict[str, list[float]]] = {}
        # "rank@host" -> anomalies that did not reproduce there: a count is of the hardware,
        # so a rank restarted on another node (off a bad one) starts again from zero
        self.transients: dict[str, int] = {}
        self.replays = 0
        self._retry_step = -1  # the step whose batch is retried (a transient fault)
        self._replay: Callable[[], Replay] | None = None
        # the slow-divergence CUSUM: its sum, its frozen baseline [median, sigma] of the log
        # loss, and [step, cursor] where the sum left 0 (the trend's onset)
        self.trend_s = 0.0
        self.trend_ref: list[float] | None = None
        self.trend_onset: list[int] | None = None

    def bind(self, ctx: Context) -> None:
        self._model = ctx.model
        self._replay = ctx.replay

    def configure(self, setup: Setup) -> None:
        """Hook the indicator probe into the model and the base optimizer's ``step``."""
        if self.probe is not None:
            self.probe.attach(setup.model)
            setup.wrap_optimizer.append(self.probe.wrap)

    def _indicators(self, state: TrainState) -> dict[str, Any] | None:
        """Collect the armed probe's values; the first threshold crossed, as a finding."""
        if self.probe is None or self._model is None:  # only called with a probe armed
            return None
        values = self.probe.collect(self._model)
        for key, reading in values.items():
            state.record(key, reading)
        if self.probe.entropy_unavailable and not self._told_unavailable:
            self._told_unavailable = True
            state.emit(
                "indicator_unavailable",
                indicator="attn_entropy",
                reason="the attention implementation returns no probabilities (sdpa/flash): "
                "build the model with eager attention to measure attention entropy (HF models "
                "get it from model.attn_implementation, eager by default with indicators on)",
            )
        cfg, step, found = self.cfg, state.step - 1, None
        checks = [
            ("update_rms", values.get("indicator/update_rms_max"), cfg.update_rms_max, 1),
            ("tev", values.get("indicator/tev_mean"), cfg.tev_max, 1),
            ("attn_entropy", values.get("indicator/attn_entropy_min"), cfg.attn_entropy_min, -1),
        ]
        for name, value, limit, sign in checks:
            if value is None or limit is None or sign * (value - limit) <= 0:
                continue
            self.warnings = [*self.warnings, [step, name, float(value)]][-64:]
            state.record("indicator/warning", 1.0)
            state.emit(
                "indicator_warning", at_step=step, indicator=name, value=value, threshold=limit
            )
            if found is None:
                found = {"detector": f"indicator_{name}", "value": value, "threshold": limit}
        return found

    def _lead(self, onset_step: int) -> dict[str, Any]:
        """How many steps before ``onset_step`` an indicator last warned (within the lookback)."""
        lo = onset_step - self.cfg.indicator_lookback
        hits = [w for w in self.warnings if lo <= int(w[0]) <= onset_step]
        if not hits:
            return {"warned_steps_before": None, "warned_by": None}
        first = min(hits, key=lambda w: int(w[0]))  # the earliest warning: the longest lead
        return {"warned_steps_before": onset_step - int(first[0]), "warned_by": first[1]}

    # -- detection ---------------------------------------------------------------------------
    def _check(self, loss: float, grad: float | None) -> dict[str, Any] | None:
        cfg = self.cfg
        if cfg.detect_nan and (
            not math.isfinite(loss) or (grad is not None and not math.isfinite(grad))
        ):
            which, value = ("loss", loss) if not math.isfinite(loss) else ("grad_norm", grad)
            return {"detector": "nan", "signal": which, "value": value, "threshold": None}
        armed = len(self.loss_hist) >= cfg.min_history
        found: dict[str, Any] | None = None
        if armed and math.isfinite(loss):
            if cfg.loss_zscore:
                z = robust_z(loss, self.loss_hist)
                self._scores["spike/loss_z"] = z
                if z > cfg.threshold:
                    found = {
                        "detector": "loss_z",
                        "value": z,
                        "loss": loss,
                        "threshold": cfg.threshold,
                    }
            if cfg.max_loss_ratio is not None:
                ratio = loss / max(1e-12, float(torch.tensor(self.loss_hist).median()))
                self._scores["spike/loss_ratio"] = ratio
                if found is None and ratio > cfg.max_loss_ratio:
                    found = {
                        "detector": "loss_ratio",
                        "value": ratio,
                        "loss": loss,
                        "threshold": cfg.max_loss_ratio,
                    }
        if grad is not None and math.isfinite(grad) and cfg.grad_norm_zscore:
            # in log space: gradient norms are heavy-tailed and multiplicative (a healthy step
            # can be several times the median), a blow-up is orders of magnitude
            z = (
                robust_z(_log(grad), [_log(g) for g in self.grad_hist], cfg.grad_scale_floor)
                if len(self.grad_hist) >= cfg.min_history
                else 0.0
            )
            self._scores["spike/grad_z"] = z
            if found is None and z > cfg.grad_threshold:
                found = {
                    "detector": "grad_z",
                    "value": z,
                    "grad_norm": grad,
                    "threshold": cfg.grad_threshold,
                }
        return found

    def _trend(self, state: TrainState, step: int) -> dict[str, Any] | None:
        """Add a healthy step's log loss to the CUSUM; a finding once it crosses the threshold."""
        cfg = self.cfg
        if cfg.trend_threshold is None or not math.isfinite(state.loss):
            return None
        if len(self.loss_hist) < cfg.min_history:
            return None
        x = _log(state.loss)
        if self.trend_s <= 0.0 or self.trend_ref is None:  # a new baseline, before this step
            logs = [_log(v) for v in self.loss_hist]
            med = float(torch.tensor(logs[-cfg.trend_baseline :], dtype=torch.float64).median())
            self.trend_ref = [med, max(noise_sigma(logs), TREND_MIN_SIGMA)]
            self.trend_onset = [step, state.cursor]
        med, sigma = self.trend_ref
        self.trend_s = max(0.0, self.trend_s + (x - med) / sigma - cfg.trend_slack)
        state.record("spike/loss_trend", self.trend_s)
        if self.trend_s <= 0.0:
            self.trend_onset = None
            return None
        if self.trend_s <= cfg.trend_threshold:
            return None
        return {
            "detector": "loss_trend",
            "value": self.trend_s,
            "loss": state.loss,
            "baseline_loss": math.exp(med),
            "onset_step": self.trend_onset[0] if self.trend_onset else step,
            "threshold": cfg.trend_threshold,
        }

    def _record_healthy(self, loss: float, grad: float | None) -> None:
        self.loss_hist = [*self.loss_hist, loss][-self.cfg.window :]
        if grad is not None and math.isfinite(grad):
            self.grad_hist = [*self.grad_hist, grad][-self.cfg.window :]

    # -- hooks -------------------------------------------------------------------------------
    def on_step_begin(self, state: TrainState) -> None:
        # measured on the steps logged as multiples of N (the loop logs step i as i + 1)
        if self.probe is not None and (state.step + 1) % self.cfg.indicators_every == 0:
            self.probe.arm()
        if self.cooldown_until >= 0 and state.step >= self.cooldown_until:
            state.set_lr_scale(1.0)
            self.cooldown_until = -1
            state.emit("cooldown_end")

    def on_before_optimizer_step(self, state: TrainState) -> Decision:
        if state.regime_change:  # e.g. a continual stage switch: the old statistics no longer apply
            self._reset(state, "regime change", state.regime_signals)
        self._scores = {}
        grad = (
            _pre_step_grad_norm(self._model, state.world_size)
            if (self.cfg.grad_norm_zscore or self.cfg.detect_nan)
            else None
        )
        self._pending = grad
        found = self._check(state.loss, grad)
        self._record_scores(state)
        if found is None:
            return Decision()
        if self._replays(found):
            reproduced, decision = self._confirm(state, found)
            if not reproduced:
                return decision
            found = {**found, "replay": "reproduced"}
        self._anomaly(state, found)
        return Decision.skip_step(reason=found)

    # -- confirmation by replay ----------------------------------------------------------------
    def _replays(self, found: dict[str, Any]) -> bool:
        """Whether this anomaly is re-run first: before a rollback (the streak reaches
        ``patience`` with it) or always; detector signals only (not the indicators)."""
        mode = self.cfg.replay
        if mode == "off" or self._replay is None:
            return False
        return mode == "always" or self.streak + 1 >= self.cfg.patience

    def _confirm(self, state: TrainState, found: dict[str, Any]) -> tuple[bool, Decision]:
        """Re-run the step; (reproduced, the decision if it did not)."""
        if self._replay is None:  # only called with a replay function bound
            raise RuntimeError("spike guard: no replay function bound")
        saved_scores = dict(self._scores)
        local = self._replay()
        self.replays += 1
        sums = all_reduce_(torch.tensor([local.loss, local.grad_sq], dtype=torch.float64))
        world = state.world_size
        loss, grad = float(sums[0]) / world, math.sqrt(max(0.0, float(sums[1]) / world))
        # the re-run's norm is of the averaged gradient, like the history's on every ZeRO stage
        again = self._check(
            loss, grad if self.cfg.grad_norm_zscore or self.cfg.detect_nan else None
        )
        self._scores = saved_scores
        ranks = all_gather_objects([local.first_loss, local.loss, socket.gethostname()])
        changed = [abs(a - b) / max(abs(b), 1e-12) for a, b, _ in ranks]
        suspect = max(range(len(ranks)), key=changed.__getitem__) if max(changed) > 0 else None
        step = state.step
        result = {
            "at_step": step,
            "detector": found["detector"],
            "first": {"loss": state.loss, "grad_norm": self._pending, "value": found["value"]},
            "replayed": {"loss": loss, "grad_norm": grad, "value": (again or {}).get("value")},
            "reproduced": again is not None,
            "cause": "data" if again is not None else "transient",
            "seconds": local.seconds,
        }
        state.record("spike/replay_s", local.seconds)
        if again is not None:
            state.emit("replay", **result)
            return True, Decision()
        host = ranks[suspect][2] if suspect is not None else None
        where_key = transient_key(suspect, host)
        self.transients[where_key] = self.transients.get(where_key, 0) + 1
        count = self.transients[where_key]
        state.emit("spike", at_step=step, streak=self.streak + 1, **found, replay="not reproduced")
        state.emit("replay", **result, rank=suspect, host=host, decision="retry")
        self._retry_step = step
        reason = {**found, "step": step, "replay": "not reproduced", "rank": suspect}
        if count < self.cfg.max_transient:
            return False, Decision.retry_step(reason=reason)
        where = f"rank {suspect} (host {host})" if suspect is not None else "an unknown rank"
        message = (
            f"spike guard: {count} anomalies on {where} did not reproduce on "
            f"replay (the last at step {step}: {found['detector']}={_fmt(found['value'])}), a "
            "transient fault (a bad accelerator or silent data corruption), not the data. "
            "Restart the job without that node (exclude it from the cluster, then "
            "`regimen resume RUN_ID`), or raise stability.max_transient."
        )
        state.emit("bad_worker", rank=suspect, host=host, transient=count)
        return False, Decision.stop(message, reason=reason, bad_rank=suspect)

    def _record_scores(self, state: TrainState) -> None:
        for name, value in self._scores.items():
            state.record(name, value)

    def _anomaly(self, state: TrainState, found: dict[str, Any], step: int | None = None) -> None:
        self.anomalies += 1
        self.streak += 1
        step = state.step if step is None else step  # index of the step being run
        self.anomaly_steps = [*self.anomaly_steps, step][-256:]
        if self.onset is None:
            self.onset = [step, state.cursor]
            self.reason = {**found, "step": step}
        state.record("spike/anomaly", 1.0)
        state.emit("spike", at_step=step, streak=self.streak, **found)

    def on_step_end(self, state: TrainState, metrics: Mapping[str, float]) -> Decision:
        step = state.step - 1  # the step just run
        if step == self._retry_step:  # a transient fault: its batch runs again, nothing learnt
            self._retry_step = -1
            return Decision()
        anomalous = bool(self.anomaly_steps) and self.anomaly_steps[-1] == step
        if not anomalous and self._pending is None and self.cfg.grad_norm_zscore:
            # ZeRO-2: gradients were not visible before the step; check the engine's norm now.
            self._scores = {}
            found = self._check(state.loss, state.grad_norm)
            self._record_scores(state)
            if found is not None:
                self._anomaly(state, found, step)
                anomalous = True
        if self.probe is not None and self.probe.armed:
            warned = self._indicators(state)
            if warned is not None and self.cfg.indicator_action == "detect" and not anomalous:
                self._anomaly(state, warned, step)
                anomalous = True
        state.record("spike/rollbacks", float(len(self.rollbacks)))
        if not anomalous:
            trend = self._trend(state, step)
            if trend is not None:  # a slow divergence: skipping a step cannot undo it
                onset = self.trend_onset or [step, state.cursor]
                self.streak, self.onset = 0, [int(onset[0]), int(onset[1])]
                self.reason = {**trend, "step": int(onset[0])}
                self._anomaly(state, trend, step)
                self.trend_s, self.trend_ref, self.trend_onset = 0.0, None, None
                return self._escalate(state)
            self.streak, self.onset = 0, None
            self._record_healthy(
                state.loss, self._pending if self._pending is not None else state.grad_norm
            )
            return Decision()
        if self.streak < self.cfg.patience:
            return Decision.skip_step(reason=self.reason)
        return self._escalate(state)

    def _escalate(self, state: TrainState) -> Decision:
        cfg = self.cfg
        if self.onset is None:  # _escalate follows an anomaly, which sets the onset
            raise RuntimeError("spike guard escalated without an anomaly onset")
        onset_step, onset_cursor = self.onset
        skip = (onset_cursor, onset_cursor + cfg.skip_batches * self.global_batch)
        if len(self.rollbacks) >= cfg.max_rollbacks:
            return Decision.stop(self._stop_message(state), reason=self.reason)
        target = self.trusted_bound(onset_step)
        record = {
            "at_step": state.step,
            "onset_step": onset_step,
            "to_step_at_most": target,
            "reason": dict(self.reason),
            "skip_range": list(skip) if cfg.skip_batches else None,
            "lr_scale": cfg.lr_scale,
            "reset_moments": cfg.reset_moments,
            **self._lead(onset_step),
        }
        self.rollbacks.append(record)
        self.streak, self.onset = 0, None
        return Decision.rollback(
            to_step=target,
            skip=[skip] if cfg.skip_batches else [],
            reset_moments=cfg.reset_moments,
            reason=record,
        )

    def trusted_bound(self, onset_step: int) -> int:
        """Latest step c <= onset - good_after whose next ``good_after`` steps had no anomaly."""
        g = self.cfg.good_after
        bound = onset_step - g
        earlier = sorted({a for a in self.anomaly_steps if a < onset_step}, reverse=True)
        for a in earlier:
            if bound <= a < bound + max(1, g):
                bound = a - g
        return max(0, bound)

    def rollback_floor(self, step: int) -> int:
        """The earliest step a rollback decided at ``step`` may return to (checkpoint retention)."""
        onset = self.onset[0] if self.onset is not None else step
        if self.trend_onset is not None:  # a trend building up may roll back to before it
            onset = min(onset, int(self.trend_onset[0]))
        return self.trusted_bound(onset)

    # -- the detector history follows the model -------------------------------------------------
    def _reset(self, state: TrainState, reason: str, signals: Iterable[str] = SIGNALS) -> None:
        """Forget the statistics of ``signals``: they re-arm after ``min_history`` steps."""
        signals = sorted(set(signals) & set(SIGNALS))
        if "loss" in signals:
            self.loss_hist = []
            self.trend_s, self.trend_ref, self.trend_onset = 0.0, None, None
        if "grad_norm" in signals:
            self.grad_hist = []
        state.emit("detector_reset", reason=reason, signals=signals)

    def _trend_state(self) -> list[float]:
        """The CUSUM as a flat list: [sum, median, sigma, onset step, onset cursor] (-1 = none)."""
        ref = self.trend_ref or [0.0, 0.0]
        onset = self.trend_onset or [-1, -1]
        return [self.trend_s, float(ref[0]), float(ref[1]), float(onset[0]), float(onset[1])]

    def _set_trend(self, flat: list[float] | None) -> None:
        s, med, sigma, o_step, o_cursor = flat if flat else [0.0, 0.0, 0.0, -1.0, -1.0]
        self.trend_s = float(s)
        self.trend_ref = [float(med), float(sigma)] if sigma > 0 else None
        self.trend_onset = [int(o_step), int(o_cursor)] if o_step >= 0 else None

    def _snapshot(self) -> dict[str, list[float]]:
        return {
            "loss_hist": list(self.loss_hist),
            "grad_hist": list(self.grad_hist),
            "trend": self._trend_state(),
        }

    def on_checkpoint_saved(self, state: TrainState, step: int, path: str) -> None:
        """Keep the statistics of this checkpoint: a rollback to it restores them."""
        self.snapshots[step] = self._snapshot()
        for old in sorted(self.snapshots)[:-MAX_SNAPSHOTS]:
            del self.snapshots[old]

    def on_checkpoint_loaded(self, state: TrainState, step: int) -> None:
        """A resume loaded the statistics of ``step`` with the guard's state: keep them too."""
        self.snapshots[step] = self._snapshot()

    def _restore_history(self, state: TrainState, step: int) -> None:
        """The statistics of checkpoint ``step`` (or none: reset and re-arm)."""
        self.snapshots = {s: h for s, h in self.snapshots.items() if s <= step}
        saved = self.snapshots.get(step)
        if saved is None:
            self._reset(state, f"rollback to step {step}: its statistics were not kept")
            return
        self.loss_hist = list(saved["loss_hist"])
        self.grad_hist = list(saved["grad_hist"])
        self._set_trend(saved.get("trend"))
        state.emit(
            "detector_restored",
            to_step=step,
            loss_history=len(self.loss_hist),
            grad_history=len(self.grad_hist),
        )

    def on_rollback(self, state: TrainState, step: int) -> None:
        # The histories go back with the model: the abandoned timeline's later (smaller)
        # losses and gradients would make the healthy steps after the restore look like spikes.
        self._restore_history(state, step)
        record = self.rollbacks[-1] if self.rollbacks else None
        if record is not None and record.get("to_step") is None:
            record["to_step"] = step
        if self.cfg.lr_scale != 1.0:
            state.set_lr_scale(self.cfg.lr_scale)
            self.cooldown_until = step + self.cfg.cooldown_steps if self.cfg.cooldown_steps else -1
        self._pending = None

    def _stop_message(self, state: TrainState) -> str:
        tried = "; ".join(
            f"spike at step {r['onset_step']} "
            f"({r['reason'].get('detector')}={_fmt(r['reason'].get('value'))}) "
            f"-> rolled back to step {r.get('to_step', r['to_step_at_most'])}"
            + (
                f", skipped samples [{r['skip_range'][0]}, {r['skip_range'][1]})"
                if r["skip_range"]
                else ""
            )
            + (f", lr x{r['lr_scale']}" if r["lr_scale"] != 1.0 else "")
            + (", moments reset" if r["reset_moments"] else "")
            for r in self.rollbacks
        )
        now = self.reason
        return (
            f"spike guard: {len(self.rollbacks)} rollback(s) used (stability.max_rollbacks="
            f"{self.cfg.max_rollbacks}) and the loss spiked again at step {now.get('step')} "
            f"({now.get('detector')}={_fmt(now.get('value'))}, threshold {now.get('threshold')}). "
            f"Tried: {tried or 'nothing (max_rollbacks is 0)'}. Fix: lower optimizer.lr, raise "
            "stability.skip_batches or stability.max_rollbacks, or set stability.lr_scale < 1."
        )

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "loss_hist": list(self.loss_hist),
            "grad_hist": list(self.grad_hist),
            "anomaly_steps": list(self.anomaly_steps),
            "streak": self.streak,
            "onset": list(self.onset) if self.onset is not None else None,
            "reason": _plain(self.reason),
            "rollbacks": _plain(self.rollbacks),
            "cooldown_until": self.cooldown_until,
            "anomalies": self.anomalies,
            "warnings": _plain(self.warnings),
            "snapshots": {str(k): _plain(v) for k, v in self.snapshots.items()},
            "transients": dict(self.transients),
            "replays": self.replays,
            "trend": self._trend_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.loss_hist = [float(v) for v in state["loss_hist"]]
        self.grad_hist = [float(v) for v in state["grad_hist"]]
        self.anomaly_steps = [int(v) for v in state["anomaly_steps"]]
        self.streak = int(state["streak"])
        self.onset = list(state["onset"]) if state["onset"] is not None else None
        self.reason = dict(state["reason"])
        self.rollbacks = [dict(r) for r in state["rollbacks"]]
        self.cooldown_until = int(state["cooldown_until"])
        self.anomalies = int(state["anomalies"])
        self.warnings = [list(w) for w in state.get("warnings", [])]
        self.snapshots = {
            int(k): {
                n: [float(x) for x in v[n]] for n in ("loss_hist", "grad_hist", "trend") if n in v
            }
            for k, v in state.get("snapshots", {}).items()
        }
        self._set_trend(state.get("trend"))
        self.transients = {str(k): int(v) for k, v in state.get("transients", {}).items()}
        self.replays = int(state.get("replays", 0))


def transient_key(rank: int | None, host: str | None) -> str:
    """Where non-reproducible anomalies are counted: one rank on one host (``-1``: no
    rank stood out)."""
    return "-1" if rank is None else f"{rank}@{host}"


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _plain(obj: Any) -> Any:
    """Only checkpoint-safe types (weights_only load): floats, ints, str, None, lists, dicts."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    return float(obj)


SPEC = TechniqueSpec(
    catalog.SPIKE_GUARD, build=lambda cfg, recipe: SpikeGuard(cfg, recipe.global_batch_size)
)
