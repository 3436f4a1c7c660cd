"""Scope ``damage``: a MACs/params budget spent where the *measured* damage is lowest.

Ranking channels by a criterion says which channels of one group matter
least; it does not say how much of the budget each group should pay. Scope
``damage`` measures that, without labels: candidate plans are rewritten in
memory and run in ONNX Runtime on a few calibration samples, and the damage
of a candidate is how far its outputs are from the original's on them
(:func:`output_damage`: the relative squared error of every output, a
classifier's logits centred per sample). It is the
allocation step of Kwon et al., *A Fast Post-Training Pruning Framework for
Transformers* (2022) and of layer-wise sensitivity analysis in general, done
on the ONNX file with the original model as the teacher, and it covers every
kind of group (channels, heads, head dims, the residual stream) in one pool.

The search is greedy with lazy re-measurement. A *step* of a group removes
its next ``1/STEPS`` of channels (in the criterion's order; whole heads for
heads; a multiple of ``round_to``). Every step is first measured alone (the
sensitivity pass); then, repeatedly, the step with the lowest damage per MAC
(or parameter) saved is re-measured on top of the steps already taken, since
pruning one group changes what pruning another costs, and is taken when it is
still the cheapest; otherwise the next cheapest is re-measured, at most
``MAX_REMEASURE`` times per step. Savings beyond what the budget still needs
count for nothing, so a coarse step that would overshoot it (a group of two
channels) does not win over finer ones by its size. The search stops as soon
as the budget is met. Its cost is one ORT run per measurement, so a slow
model gets a search sized to :data:`SEARCH_SECONDS`: fewer samples per
candidate (down to :data:`MIN_SAMPLES`) and coarser steps
(:func:`planned_steps`: 1/8 or 1/4 of a group; heads still one at a time), but
not so coarse that the budget is met in fewer than :data:`MIN_STEPS` steps
while a finer search is expected within :data:`OVER` budgets. A search that
even the coarsest steps are expected to take longer than the budget is held to it
in measurements (``SEARCH_SECONDS`` over a measurement's time and
:data:`RUN_OVERHEAD`; the sensitivity pass is always whole): once they are
spent, the remaining steps are taken on the damages last measured, each
further step of a group priced by the second-order model (the damage grows
with the square of the steps it lost), with no run of its own. The module is
pure: measuring is the caller's (``measure(keep)``), and so is counting
(``estimate(keep)``). When ``--recover`` follows, the pipeline measures each
candidate with the removed channels' mean contribution folded into their
consumers' biases (:mod:`onnxprune.plan.compensate`), as recovery
gives it back: the damage it prices is what recovery cannot undo by a
constant (on EfficientNet-Lite0 at 70% of its MACs, 30.2% -> 46.8% top-1 agreement on new photos after recovery).
Where it is clearly faster (:data:`ZEROED_GAIN`) and gives the same damage on
a probe, the pipeline runs candidates of exact groups in one session of the
original with the removed channels zeroed instead of rewriting each
(``Job._fed_runs``; :data:`ZEROED`); each zeroed candidate then runs from the
first node its edits reach, fed the values the search's current plan left
there (:class:`onnxprune.runtime.capture.Resume`, :data:`RESUME`; ``allocate``
tells it each plan it moves to, and when that is the step just measured, the
values its run made at the later starting points are taken over, with no run
of their own: on the ViT-S with a dense decoder at 70% of its MACs, 40 of 41
moves, the search 95 s -> 72 s, the plan the same; pieces that ONNX Runtime's full optimisation level
refuses, as dynamo's MaxViT's, run at its extended level, and partial runs are kept only where a
candidate at mid depth is faster so than the whole model); since the probe runs the whole model, a zeroed
probe that is not clearly faster is followed by a candidate at mid depth,
timed as it would run. Every timing that steers the search is the
fastest of :data:`TIMINGS` runs, so that one machine writes one plan (one run
where a second could not change the outcome).
"""
from __future__ import annotations

import heapq
import logging
import math

import numpy as np

log = logging.getLogger(__name__)

STEPS = 16  # a step removes 1/16 of a group's channels (1/8 left 65.5% agreement on Lite0 at 90% MACs, 1/16 69.5%)
MAX_FRACTION = 7 / 8  # no group loses more than this (never emptied)
SAMPLES = 32  # calibration samples each candidate is measured on (whole batches: at least this many)
RUN_SECONDS = 0.35  # when the original takes longer than this on them, fewer samples ...
MIN_SAMPLES = 6  # ... but not fewer than this. A ViT-S with a dense decoder on 2 cores (1.9 s for 32 samples),
# Pearson per crop on new photos after --recover and the whole call (candidates rewritten, before they were
# zeroed in one session): 6 samples 0.974 / 163 s at 90% MACs, 0.915 / 171 s at 70%; 8 samples 0.983 / 172 s
# and 0.915 / 184 s (tools/pretrained_vit.py); 4: worse, more candidates
MAX_REMEASURE = 4  # stale candidates re-measured per step before the best fresh one is taken
RUN_OVERHEAD = 1.2  # a measurement in the search takes about this much longer than the timed candidate (moving the
# held values on, settling on each plan): the ViT-S with a dense decoder at 70% of its MACs, 157 measurements in 73 s
# after 0.381 s timed, in 82 s after 0.433 s (1.22, 1.21)
SEARCH_SECONDS = 60.0  # a search expected to take longer takes coarser steps ...
STEP_CHOICES = (16, 8, 4)  # ... the finest of these that fits (planned_steps). Expected from a zeroed candidate at
# mid depth where candidates run from their first edit (the whole probe's run expected about 1.9x the real time):
# the ViT-S with a dense decoder at 90% of its MACs expects 79 s at 1/16 and 52 s at 1/8 (44 s real), at 70% 77 s
# at 1/4 (75 s real); EfficientNet-Lite0 at 70% 50 s at 1/16 (54 s real); tools/search_budget.py. A budget the
# whole --recover call can afford on the ViT-S (its recovery takes about 70 s)
ZEROED = None  # candidates zeroed in one session (see Job._fed_runs): None, when faster than rewritten; True/False: forced
ZEROED_GAIN = 0.85  # "faster": the zeroed probe takes at most this share of the rewritten one's time (near-equal
# times chose either way from run to run on EfficientNet-Lite0, and the two give different near-ties to the greedy)
RESUME = True  # zeroed candidates run from the first node their edits reach (runtime.capture.Resume)
TIMINGS = 2  # every timing that steers the search (one candidate; the probe each way) is the fastest of this many
# runs: single runs of one Lite0 probe took 0.51 s and 0.66 s in two calls, close to the 1/16 steps' time limit
WARM_GAIN = 1.5  # a warm run is taken to be at most this much faster than a session's first (cold) one: the
# original's first timed run is repeated only where a run that much faster could give more than MIN_SAMPLES
MIN_STEPS = 24  # a step count expected to meet the budget in fewer steps than this is too coarse ...
OVER = 2.0  # ... and gives way to the next finer one expected within this many SEARCH_SECONDS (the ViT-S with a dense
# decoder at 90% of its MACs: 21 steps expected at 1/4, 38 at 1/8; the clock chose either from run to run, and the
# 1/4 plan kept 0.963 Pearson per crop on new photos after --recover, the 1/8 one 0.986; tools/search_budget.py)
TINY_STEP = 0.05  # a group whose step saves less than this share of the median group's step is not counted in
# the expected steps: the greedy seldom spends a step on it, and 1 / its saving decided the whole count (at 1/4 of
# a group, EfficientNet-B0 at 70% of its MACs expected 18,611 steps and took 29, MobileNetV3-Small 0.5 1,949 and 33,
# GhostNet 0.5 990 and 43: the coarsest steps for searches of seconds; without those groups 19, 39 and 54; the
# ViT-S, EfficientNet-Lite0 and the other timm models of tools/recover_zoo.py have no such group)
PER_STEP = 2.0  # measurements per step expected (re-measurements included); with planned_steps' count of
# steps, the ViT-S with a dense decoder at 90% / 70% MACs: 111 / 256 expected at 1/16, 98 / 218 measured;
# at 1/4 for 70%: 123 expected, 124 to 170 measured


def is_logits(a: np.ndarray) -> bool:
    """A classifier's scores: ``[N, classes]`` with more than one class."""
    return a.ndim == 2 and a.shape[1] > 1


def output_damage(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    """How far ``got`` (a model's outputs) is from ``ref`` (the original's):
    ``||got - ref||^2 / ||ref||^2`` over every float output, a first output
    shaped like a classifier's logits (``[N, classes]``) centred per sample first (the softmax does not
    see a shift). Unlike the KL divergence of the softmax, this keeps growing
    as a model moves further away, so a greedy search does not take a model
    that is already far off as free to prune further (on EfficientNet-Lite0 at
    70% of its MACs, KL as the damage left 3% top-1 agreement after recovery,
    this 31%). Non-finite outputs are infinitely far."""
    num = den = 0.0
    for k, (r, g) in enumerate(zip(ref, got)):
        if not np.issubdtype(r.dtype, np.floating) or r.shape != g.shape:
            continue
        if not np.all(np.isfinite(g)):
            return math.inf
        r, g = r.astype(np.float64), g.astype(np.float64)
        if k == 0 and is_logits(r):
            r, g = r - r.mean(1, keepdims=True), g - g.mean(1, keepdims=True)
        num += float(((g - r) ** 2).sum())
        den += float((r**2).sum())
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def step_size(width: int, kind: str, round_to: int, steps: int = STEPS) -> int:
    """Channels one step of a group removes (``steps``: steps to the whole width)."""
    if kind == "heads":
        return 1
    n = max(1, int(round(width / steps)))
    if round_to > 1:
        n = max(round_to, int(round(n / round_to)) * round_to)
    return n


def planned_steps(groups, estimate, metric: str, target: float, round_to: int, seconds: float,
                  budget: float | None = None, min_steps: int | None = None) -> tuple[int, dict[int, float]]:
    """The finest step count of :data:`STEP_CHOICES` whose search is expected
    to fit ``budget`` seconds (default :data:`SEARCH_SECONDS`) when one
    measurement takes ``seconds`` (the coarsest when none does), and the expected seconds of each count tried.
    Expected: the sensitivity pass (one measurement per group) plus
    :data:`PER_STEP` measurements per step, as many steps as the budget takes
    when every group gives the same share of it (the saving still needed
    times the mean over groups of 1 / a step's saving; groups whose step saves
    under :data:`TINY_STEP` of the median one left out). A slow model takes
    coarser steps; a small CNN keeps the finest. A count that would meet the
    budget in fewer than ``min_steps`` (default :data:`MIN_STEPS`) steps gives
    way to the next finer one where that is expected within :data:`OVER`
    budgets: a small budget is not spent in a few coarse steps because the
    clock read a little slow."""
    budget = SEARCH_SECONDS if budget is None else budget
    min_steps = MIN_STEPS if min_steps is None else min_steps
    groups = [g for g in groups if g.width > 1]
    before = estimate({})[metric]
    need = max(before - target, 0.0)
    guesses: dict[int, float] = {}
    counts: dict[int, float] = {}  # steps the budget is expected to take
    chosen = STEP_CHOICES[-1]
    for steps in STEP_CHOICES:
        saved = [before - estimate({g.id: np.arange(g.width - step_size(g.width, g.kind, round_to, steps))})[metric]
                 for g in groups if g.width - step_size(g.width, g.kind, round_to, steps) >= 1]
        saved = np.array([v for v in saved if v > 0], float)
        if len(saved):  # a group whose step saves almost nothing (squeeze-excite, ghost modules) is left out
            saved = saved[saved >= TINY_STEP * float(np.median(saved))]
        counts[steps] = need * float(np.mean(1 / saved)) if len(saved) else 0.0
        guesses[steps] = seconds * (len(groups) + PER_STEP * counts[steps])
        if guesses[steps] <= budget:
            chosen = steps
            break
    at = STEP_CHOICES.index(chosen)
    if at > 0 and counts[chosen] < min_steps and guesses[STEP_CHOICES[at - 1]] <= OVER * budget:
        chosen = STEP_CHOICES[at - 1]
    return chosen, guesses


def allocate(groups, order: dict[int, np.ndarray], measure, estimate, metric: str, target: float,
             round_to: int = 1, progress=None, steps_to_width: int = STEPS, settled=None,
             max_measurements: int | None = None) -> tuple[dict[int, np.ndarray], dict]:
    """The plan (group id -> kept indices) that meets ``target`` (an absolute
    count of ``metric``) with the least measured damage found by the greedy
    search. ``groups``: the prunable groups (``.id``, ``.width``, ``.kind``,
    ``.set_name``); ``order[id]``: its channels, most important first;
    ``measure(keep)``: the damage of a plan; ``estimate(keep)``: its counts;
    ``settled(keep)``, when given: told each plan the search moves to (every
    later candidate is that plan and one more step). ``max_measurements``:
    once this many are spent (the sensitivity pass is always whole), the
    remaining steps are taken without measuring, on the damages last
    measured, a group's next step priced by the second-order model (its
    damage grows with the square of the steps it lost: step ``j`` costs
    ``2j - 1`` units); ``info["unmeasured"]`` counts these steps.
    Returns the plan and an info dict (measurements, damage, the steps taken)."""
    groups = [g for g in groups if g.width > 1]
    removed = {g.id: 0 for g in groups}
    by_id = {g.id: g for g in groups}
    steps = {g.id: step_size(g.width, g.kind, round_to, steps_to_width) for g in groups}
    cap = {g.id: min(g.width - 1, int(math.floor(MAX_FRACTION * g.width))) for g in groups}

    def keep_of(rem: dict[int, int]) -> dict[int, np.ndarray]:
        return {gid: np.sort(order[gid][: by_id[gid].width - n]) for gid, n in rem.items() if n}

    def allowed(g) -> np.ndarray:  # removal counts that leave a multiple of round_to (heads: any count)
        rt = 1 if g.kind == "heads" else round_to
        n = np.arange(cap[g.id] + 1)
        return n[(n == 0) | ((g.width - n) % rt == 0)]

    counts = {g.id: allowed(g) for g in groups}

    def trial(gid: int) -> dict[int, int] | None:
        c = counts[gid]
        i = int(np.searchsorted(c, removed[gid] + steps[gid]))
        n = int(c[min(i, len(c) - 1)])
        return None if n <= removed[gid] else {**removed, gid: n}

    before = count = estimate({})[metric]
    evals = 0
    history = []

    def measured(gid: int, base_damage: float, base_count: float):
        """(damage per unit saved, damage) of ``gid``'s next step on top of the current plan."""
        nonlocal evals
        t = trial(gid)
        if t is None:
            return None
        keep = keep_of(t)
        saved = base_count - estimate(keep)[metric]
        if saved <= 0:
            return None
        d = measure(keep)
        evals += 1
        useful = min(saved, base_count - target)  # what a step saves beyond the budget is worth nothing
        return (d - base_damage) / useful, d

    damage, state = 0.0, 0
    heap: list[tuple] = []  # (damage per unit saved, group id, state measured at, damage measured)
    for i, g in enumerate(groups):
        m = measured(g.id, 0.0, count)
        if m is not None:
            heapq.heappush(heap, (m[0], g.id, state, m[1]))
        if progress:
            progress(f"sensitivity: {i + 1}/{len(groups)} groups measured")
    unmeasured, taken = 0, {g.id: 0 for g in groups}  # steps taken per group
    while count > target and heap:
        chosen, tries = None, 0
        spent = max_measurements is not None and evals >= max_measurements
        while heap:
            s, gid, at, d = heap[0]
            if at == state:  # measured on the current plan and still the cheapest
                chosen = heapq.heappop(heap)
                break
            if spent or tries >= MAX_REMEASURE:  # the cheapest freshly measured one, else this one as last measured
                fresh = [e for e in heap if e[2] == state]
                chosen = min(fresh) if fresh else heap[0]
                heap.remove(chosen)
                heapq.heapify(heap)
                break
            heapq.heappop(heap)
            m = measured(gid, damage, count)
            tries += 1
            if m is not None:
                heapq.heappush(heap, (m[0], gid, state, m[1]))
        if chosen is None:
            break
        s, gid, at, d = chosen
        fresh = at == state
        t = trial(gid)
        new_count = estimate(keep_of(t))[metric]
        if new_count < target:  # the last step: only as many channels as the budget still needs
            c = counts[gid]
            lo, hi = int(np.searchsorted(c, removed[gid])), int(np.searchsorted(c, t[gid]))
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if estimate(keep_of({**removed, gid: int(c[mid])}))[metric] <= target:
                    hi = mid
                else:
                    lo = mid
            if int(c[hi]) < t[gid]:
                t = {**removed, gid: int(c[hi])}
                new_count, at = estimate(keep_of(t))[metric], -1  # a smaller step than measured
        damage = d if at == state else damage + max(s, 0.0) * (count - new_count)
        unmeasured += spent and not fresh
        taken[gid] += 1
        removed, count, state = t, new_count, state + 1
        if spent:  # no measurement will price its next step: the second-order model's growth, step j -> j + 1
            j = taken[gid]
            s = max(s, 0.0) * (2 * j + 1) / (2 * j - 1)
        elif settled is not None and count > target:
            settled(keep_of(removed))
        history.append({"group": gid, "set": by_id[gid].set_name, "removed": removed[gid], "width": by_id[gid].width,
                        metric: count, "damage": damage})
        if progress:
            progress(f"allocation: {metric} {count / max(before, 1):.1%} of the original, damage {damage:.4g} "
                     f"({evals} measurements)")
        if trial(gid) is not None:
            heapq.heappush(heap, (s, gid, -1, d))  # its next step: as costly as this one until re-measured
    info = {"measurements": evals, "steps": len(history), "unmeasured": unmeasured, "step": f"1/{steps_to_width}", "damage": damage,
            "met": count <= target,
            "history": history}
    return keep_of(removed), info


__all__ = ["allocate", "planned_steps", "output_damage", "is_logits", "step_size", "STEPS", "STEP_CHOICES",
           "SEARCH_SECONDS", "PER_STEP", "RUN_OVERHEAD", "TINY_STEP", "MIN_STEPS", "OVER", "ZEROED", "RESUME", "ZEROED_GAIN", "TIMINGS",
           "MAX_FRACTION", "SAMPLES", "RUN_SECONDS", "MIN_SAMPLES", "WARM_GAIN"]
