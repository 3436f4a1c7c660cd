"""ratios.json, importance and the plan (which channel indices each group keeps).

The plan is a plain mapping ``group id -> kept indices`` plus what produced it,
so it can be saved in the report, inspected and replayed on the same model
(group ids are deterministic for a given file).
"""
from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import dataclass, field

import numpy as np

from onnxprune.core.analysis import Analysis
from onnxprune.core.groups import KINDS, Group
from onnxprune.errors import UserError
from onnxprune.plan.importance.criteria import CRITERIA as IMPORTANCES
from onnxprune.plan.importance.criteria import Scores, score_groups

SCOPES = ("isomorphic", "global", "local", "cost", "damage")


def read_json(src: str | dict, what: str) -> dict:
    """A JSON object given inline (``{...}``), as a file path, or as a dict."""
    if isinstance(src, dict):
        return src
    text = src
    if not text.lstrip().startswith("{"):
        try:
            with open(src) as f:
                text = f.read()
        except OSError as e:
            raise UserError(f"cannot read {what} file {src}: {e.strerror}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        verb = "are" if what.endswith("s") else "is"
        raise UserError(f"{what} {verb} not valid JSON ({e.msg} at line {e.lineno})") from None
FIELDS = {"default", "kinds", "sets", "layers", "ignore", "round_to", "scope", "importance", "seed",
          "target_macs", "target_params", "target_latency", "input_shapes"}
UNROUNDED_KINDS = {"heads"}  # heads are pruned whole: round_to applies to widths, not to head counts


def _ratio(x, where: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise UserError(f"ratio for {where} must be a number, got {x!r}")
    if not 0.0 <= float(x) < 1.0:
        raise UserError(f"ratio for {where} must be in [0, 1), got {x}")
    return float(x)


@dataclass
class Ratios:
    default: float = 0.0
    kinds: dict[str, float] = field(default_factory=dict)
    sets: dict[str, float] = field(default_factory=dict)
    layers: dict[str, float] = field(default_factory=dict)
    ignore: list[str] = field(default_factory=list)
    round_to: int = 1
    scope: str = "isomorphic"
    importance: str | dict = "l2"  # a criterion, or {kind | "default": criterion}
    seed: int = 0
    target_macs: float | str | None = None
    target_params: float | str | None = None
    target_latency: float | str | None = None  # "60%", 0.6 or "12ms": measured on the runtime (plan.latency)
    input_shapes: dict = field(default_factory=dict)  # {input name: [dims]}: fixes dynamic input dims
    given: frozenset = frozenset()  # the fields the user wrote

    @classmethod
    def from_dict(cls, d: dict) -> "Ratios":
        if not isinstance(d, dict):
            raise UserError("ratios must be a JSON object")
        unknown = set(d) - FIELDS
        if unknown:
            raise UserError(f"unknown field(s) in ratios: {', '.join(sorted(unknown))} (allowed: {', '.join(sorted(FIELDS))})")
        r = cls()
        r.given = frozenset(d)
        r.default = _ratio(d.get("default", 0.0), "'default'")
        for key in ("kinds", "sets", "layers"):
            val = d.get(key, {})
            if not isinstance(val, dict):
                raise UserError(f"'{key}' must be an object of name: ratio")
            setattr(r, key, {str(k): _ratio(v, f"{key} '{k}'") for k, v in val.items()})
        bad = set(r.kinds) - set(KINDS)
        if bad:
            raise UserError(f"unknown kind(s) {', '.join(sorted(bad))} (kinds: {', '.join(KINDS)})")
        ig = d.get("ignore", [])
        if not isinstance(ig, list) or not all(isinstance(x, str) for x in ig):
            raise UserError("'ignore' must be a list of name globs")
        r.ignore = ig
        rt = d.get("round_to", 1)
        if isinstance(rt, bool) or not isinstance(rt, int) or rt < 1:
            raise UserError(f"'round_to' must be a positive integer, got {rt!r}")
        r.round_to = rt
        r.scope = d.get("scope", "isomorphic")
        if r.scope not in SCOPES:
            raise UserError(f"unknown scope {r.scope!r} (scopes: {', '.join(SCOPES)})")
        imp = d.get("importance", "l2")
        spec = imp if isinstance(imp, dict) else {"default": imp}
        if not isinstance(imp, (str, dict)):
            raise UserError("'importance' must be a criterion or an object {kind: criterion}")
        for k, v in spec.items():
            if k != "default" and k not in KINDS:
                raise UserError(f"importance: unknown kind {k!r} (kinds: {', '.join(KINDS)}, or 'default')")
            if v not in IMPORTANCES:
                raise UserError(f"unknown importance {v!r} (criteria: {', '.join(IMPORTANCES)})")
        r.importance = imp
        seed = d.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise UserError("'seed' must be an integer")
        r.seed = seed
        for key in ("target_macs", "target_params"):
            val = d.get(key)
            if val is not None and (isinstance(val, bool) or not isinstance(val, (int, float, str))):
                raise UserError(f"'{key}' must be a number (fraction or absolute) or a string like '50%', '4.2G'")
            setattr(r, key, val)
        if r.target_macs is not None and r.target_params is not None:
            raise UserError("give target_macs or target_params, not both")
        r.target_latency = d.get("target_latency")
        if r.target_latency is not None:
            from onnxprune.plan.latency import parse_latency

            parse_latency(r.target_latency)  # one-line error now, not after the scores
            if r.target is not None:
                raise UserError("give target_latency or target_macs / target_params, not both")
        shapes = d.get("input_shapes", {})
        if not isinstance(shapes, dict):
            raise UserError("'input_shapes' must be an object {input name: [dims]}")
        from onnxprune.io import parse_input_shapes

        r.input_shapes = parse_input_shapes(shapes)
        return r

    @classmethod
    def load(cls, path_or_json: str | dict | None) -> "Ratios":
        if path_or_json is None:
            return cls()
        return cls.from_dict(read_json(path_or_json, "ratios"))

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "given"}

    @property
    def importance_spec(self) -> dict:
        return dict(self.importance) if isinstance(self.importance, dict) else {"default": self.importance}

    # -- budgets -----------------------------------------------------------------------
    @property
    def target(self) -> tuple[str, object] | None:
        if self.target_macs is not None:
            return "macs", self.target_macs
        if self.target_params is not None:
            return "params", self.target_params
        return None

    def ratio_dict(self) -> dict:
        """The ratio fields only (what a budget search changes)."""
        out = {"default": self.default}
        for key in ("kinds", "sets", "layers"):
            if getattr(self, key):
                out[key] = dict(getattr(self, key))
        return out

    def max_ratio(self) -> float:
        vals = [self.default, *self.kinds.values(), *self.sets.values(), *self.layers.values()]
        return max(vals, default=0.0)

    def base_for_target(self) -> "Ratios":
        """The ratios a budget scales: the given ones, or 1 for every group when
        none is non-zero (uniform pruning)."""
        if self.max_ratio() > 0:
            return self
        r = Ratios(**{**self.__dict__, "kinds": dict(self.kinds), "sets": dict(self.sets), "layers": dict(self.layers)})
        r.default = 1.0
        return r

    def scaled(self, s: float, cap: float) -> "Ratios":
        f = lambda x: min(cap, x * s)
        r = Ratios(**{**self.__dict__})
        r.default = f(self.default)
        r.kinds = {k: f(v) for k, v in self.kinds.items()}
        r.sets = {k: f(v) for k, v in self.sets.items()}
        r.layers = {k: f(v) for k, v in self.layers.items()}
        r.target_macs = r.target_params = r.target_latency = None
        return r

    # -- lookup ------------------------------------------------------------------------
    def ignored(self, g: Group) -> str | None:
        names = g.names() | {g.set_name}
        for pat in self.ignore:
            if any(fnmatch.fnmatchcase(n, pat) for n in names):
                return pat
        return None

    def layer_ratio(self, g: Group) -> float | None:
        names = g.names()
        for pat, r in self.layers.items():
            if any(fnmatch.fnmatchcase(n, pat) for n in names):
                return r
        return None

    def set_ratio(self, set_name: str, kind: str) -> tuple[float, str]:
        if set_name in self.sets:
            return self.sets[set_name], f"sets[{set_name}]"
        for pat, r in self.sets.items():
            if fnmatch.fnmatchcase(set_name, pat):
                return r, f"sets[{pat}]"
        if kind in self.kinds:
            return self.kinds[kind], f"kinds[{kind}]"
        return self.default, "default"


@dataclass
class Plan:
    keep: dict[int, np.ndarray]  # group id -> kept indices (sorted)
    ratios: dict[int, tuple[float, str]]  # group id -> (ratio, where it came from)
    scores: dict[int, np.ndarray]
    skipped: dict[int, str]  # group id -> why it was left whole
    target: dict | None = None  # what a target_macs / target_params search found
    importance: Scores | None = None  # criterion used per group, fallbacks, GOHSP matrices
    criteria: dict | None = None  # kind -> criterion that ranked it
    ratios_given: dict | None = None  # the ratios.json that made this plan

    # -- the plan file ------------------------------------------------------------------
    def to_json(self, groups: list[Group], model_file: str | None = None) -> dict:
        """The plan in stable terms: each group by its members' node/tensor names,
        with its kind, set, width and kept indices (null: kept whole)."""
        rows = []
        for g in groups:
            row = {"kind": g.kind, "set": g.set_name, "width": g.width,
                   "keep": None if g.id not in self.keep else [int(i) for i in self.keep[g.id]]}
            if g.id in self.ratios:
                row["ratio"], row["from"] = self.ratios[g.id]
            if g.frozen:
                row["frozen"] = g.frozen[0]
            elif g.id in self.skipped:
                row["skipped"] = self.skipped[g.id]
            row["members"] = [member_key(m) for m in g.tensors]
            rows.append(row)
        return {"onnxprune_plan": PLAN_VERSION, "model": model_file, "groups_total": len(groups),
                "ratios": self.ratios_given, "criteria": self.criteria, "target": self.target, "groups": rows}

    @classmethod
    def from_json(cls, data: dict, groups: list[Group], where: str = "plan") -> "Plan":
        """Replay a plan file on the analysed model it was made for; refuses (one
        line) when a group does not match or kept indices are out of range."""
        if not isinstance(data, dict) or data.get("onnxprune_plan") != PLAN_VERSION or not isinstance(data.get("groups"), list):
            raise UserError(f"{where} is not an onnxprune plan file (version {PLAN_VERSION})")
        # one axis can hold several groups (a fused qkv's heads x head dims): a
        # group is its members with its kind and width, in the order analysed
        by_members: dict[tuple, list[Group]] = {}
        widths: dict[frozenset, list[int]] = {}
        for g in groups:
            mem = frozenset(member_key(m) for m in g.tensors)
            by_members.setdefault((mem, g.kind, g.width), []).append(g)
            widths.setdefault(mem, []).append(g.width)
        plan = cls({}, {}, {}, {}, target=data.get("target"), criteria=data.get("criteria"), ratios_given=data.get("ratios"))
        for i, row in enumerate(data["groups"]):
            if not isinstance(row, dict) or not isinstance(row.get("members"), list):
                raise UserError(f"{where}: group #{i} has no member list")
            same = widths.get(frozenset(row["members"]))
            if not same:
                raise UserError(f"{where} does not fit this model: group #{i} ({row.get('kind')}, {row.get('set')}) "
                                f"has no counterpart (was the plan made on another model?)")
            left = by_members.get((frozenset(row["members"]), row.get("kind"), row.get("width")))
            if not left:
                raise UserError(f"{where} does not fit this model: group #{i} has width {row.get('width')}, "
                                f"the model {' or '.join(map(str, same))}")
            g = left.pop(0)
            keep = row.get("keep")
            if keep is None:
                continue
            if g.frozen:
                raise UserError(f"{where}: group #{i} ({g.kind}, {g.set_name}) is frozen in this model: {g.frozen[0]}")
            if (not isinstance(keep, list) or not keep or not all(isinstance(k, int) and not isinstance(k, bool) for k in keep)
                    or len(set(keep)) != len(keep) or min(keep) < 0 or max(keep) >= g.width):
                raise UserError(f"{where}: group #{i} 'keep' must be a non-empty list of distinct indices in [0, {g.width})")
            if len(keep) < g.width:
                plan.keep[g.id] = np.array(sorted(keep), dtype=np.int64)
            if "ratio" in row:
                plan.ratios[g.id] = (row["ratio"], row.get("from", "plan file"))
        if data.get("groups_total") not in (None, len(groups)):
            raise UserError(f"{where} does not fit this model: it lists {data['groups_total']} groups, the model has {len(groups)}")
        return plan


PLAN_VERSION = 1


def member_key(m) -> str:
    """A member axis by names that survive a reload: ``node[input slot] tensor axis``."""
    return f"{m.node.name}[{m.slot}] {m.value.name} axis {m.axis}"


def _n_keep(width: int, n_remove: int, round_to: int) -> int:
    keep = width - n_remove
    if round_to > 1:
        keep = int(round(keep / round_to)) * round_to
        keep = max(keep, min(round_to, width))
    return int(min(width, max(1, keep)))


def compute_scores(ctx: Analysis, groups: list[Group], ratios: Ratios, proto=None, calib=None, after_group=None) -> Scores:
    """Channel importance of every prunable group (criteria from ``ratios``;
    data-driven ones need the model ``proto`` and calibration batches)."""
    return score_groups(ctx, groups, ratios.importance_spec, ratios.seed, proto, calib, after_group)


def plannable(groups: list[Group], ratios: Ratios, plan: Plan):
    """``(group, ratio, where the ratio came from)`` for every group a plan may
    prune: frozen groups are left out, ignored ones recorded in ``plan.skipped``."""
    for g in groups:
        if g.frozen:
            continue
        pat = ratios.ignored(g)
        if pat:
            plan.skipped[g.id] = f"ignored by '{pat}'"
            continue
        lr = ratios.layer_ratio(g)
        yield (g, lr, "layers") if lr is not None else (g, *ratios.set_ratio(g.set_name, g.kind))


def make_plan(ctx: Analysis, groups: list[Group], ratios: Ratios, scores: Scores | None = None) -> Plan:
    """Which channels each group keeps. ``scores`` (from :func:`compute_scores`)
    can be passed in when many plans are made for one model."""
    if scores is None:
        scores = compute_scores(ctx, groups, ratios)
    plan = Plan({}, {}, {}, {}, importance=scores)
    pools: dict[tuple, list[Group]] = {}
    for g, r, src in plannable(groups, ratios, plan):
        plan.ratios[g.id] = (r, src)
        plan.scores[g.id] = scores.values[g.id]
        if r <= 0:
            continue
        if ratios.scope == "local" or src == "layers":
            key = ("group", g.id)
        elif ratios.scope == "isomorphic":
            key = ("set", g.set_name, r)
        elif ratios.scope == "cost":
            # one pool, by score per MAC (or parameter) a channel saves. Only recon's scores
            # (relative errors) compare across layers, and only where the channel's effect is
            # linear up to its consumers: a group that fell back to another criterion, and
            # attention dims (heads, head_dim: their error passes through a softmax the score
            # does not see), are ranked within their isomorphic set instead
            pooled = scores.used.get(g.id) == "recon" and g.kind not in ("heads", "head_dim")
            key = ("cost", r) if pooled else ("set", g.set_name, r)
        else:
            key = ("global", g.kind, r)
        pools.setdefault(key, []).append(g)
    for key, members in pools.items():
        r = plan.ratios[members[0].id][0]
        total = sum(g.width for g in members)
        n_remove = int(math.floor(r * total + 1e-9))
        if len(members) == 1:
            counts = {members[0].id: n_remove}
        else:
            # rank every channel of the pool together; never empty a group
            cand = []
            for g in members:
                s = plan.scores[g.id]
                if key[0] == "cost":
                    s = s / max(scores.unit.get(g.id, 0.0), 1e-12)
                order = np.argsort(s, kind="stable")[: g.width - 1]
                cand.extend((float(s[i]), g.id, int(i)) for i in order)
            cand.sort(key=lambda t: (t[0], t[1], t[2]))
            counts = {g.id: 0 for g in members}
            for _, gid, _ in cand[:n_remove]:
                counts[gid] += 1
        for g in members:
            keep_n = _n_keep(g.width, counts[g.id], 1 if g.kind in UNROUNDED_KINDS else ratios.round_to)
            if keep_n >= g.width:
                continue
            order = np.argsort(-plan.scores[g.id], kind="stable")
            plan.keep[g.id] = np.sort(order[:keep_n])
    return plan
