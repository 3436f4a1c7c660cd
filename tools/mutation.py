"""Mutation testing of the modules whose numbers the tests pin (mutmut).

For each module below, mutmut makes small edits to it (a changed operator,
constant, condition...) one at a time and runs that module's targeted fast
tests; a mutant the tests still pass on has *survived*: a behaviour no test
holds. Each module runs in its own scratch copy of the repository (onnxprune/,
tests/, pyproject.toml with a [tool.mutmut] section naming that one module and
its tests), so nothing is written into the checkout but the report.

    pip install -e ".[all,mutation]"
    python tools/mutation.py                       # every module (long on a small machine)
    python tools/mutation.py onnxprune/core/metrics.py --max-children 2

Writes tools/results/mutation.md: killed / survived / other per module and
every survivor with its edit and a one-line reason (from REASONS below, filled
in by whoever reviewed the run; "not reviewed" otherwise).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "tools" / "results" / "mutation.md"

# module -> pytest arguments selecting its targeted fast tests
MODULES = {
    "onnxprune/core/metrics.py": ["tests/test_mut_metrics.py", "tests/test_metrics_shapes.py"],
    "onnxprune/plan/budget.py": ["tests/test_mut_budget.py"],
    # test_mut_taylor imports torch at collection (mutmut's fork server loads it once), so its tests are fast
    "onnxprune/plan/importance/criteria.py": ["tests/test_mut_criteria.py", "tests/test_mut_taylor.py", "tests/test_importance.py",
                                              "tests/test_scopes.py", "-k", "test_mut_criteria or test_mut_taylor "
                                              "or magnitude_scores_by_hand or activation_scores_by_hand "
                                              "or hand_matrix or spec_validation or scope or fixture"],
    # the scope and ratio logic: Ratios (ratios.json), make_plan's pools, _n_keep's rounding
    "onnxprune/plan/__init__.py": ["tests/test_mut_plan.py", "tests/test_scopes.py"],
    # the rewriter's output checked directly, no runtime (test_rules' pruned-model runs take ORT sessions per test)
    "onnxprune/rewrite.py": ["tests/test_mut_rewrite.py"],
    "onnxprune/validate/oracle.py": ["tests/test_mut_oracle.py", "tests/test_rules.py", "-k",
                                     "test_mut_oracle or oracle or conv_relu_conv"],
}

# why a mutant survives (an equivalent mutant, or a gap the selected tests leave), reviewed by hand:
# (module, substring of the ORIGINAL line, substring of the mutated line or "", reason); first match wins.
# Mutant numbers change with every edit of a module, so reasons are keyed by the code they mutate.
REASONS: list[tuple[str, str, str, str]] = [
    ("metrics.py", 'Factor(sizes[0], ("x", "q", 0))', "sizes[1]", "equivalent: QK^T needs equal q and k widths, "
     "so sizes[0] == sizes[1] in any valid packed Attention"),
    ("metrics.py", 'past_slot = 3 if n.op_type == "GroupQueryAttention"', "past_slot = 4", "equivalent: "
     "GroupQueryAttention's past_value (slot 4) has past_key's shape [B, kv heads, P, D]"),
    ("metrics.py", "ins = [shapes.get(x) if x else None", "", "equivalent: an empty (left out) input name has no shape"),
    ("metrics.py", "[w[1] // 3] * 3", "* 4", "equivalent: only sizes[0] and sizes[2] are read"),
    ("metrics.py", "_ms_terms(k, n, shapes, inits)", "None)", "equivalent: _ms_terms never reads its inits argument"),
    ("metrics.py", 'at.name == "transA"), 0)', "), None)", "equivalent: a missing transA reads as false either way"),
    ("metrics.py", "len(n.input) > wslot", "", "equivalent: ONNX requires a Conv's weight input, so a Conv "
     "never has fewer inputs than its weight slot"),
    ("budget.py", "elif 0 < x <= 1:", "0 <= x", "equivalent: x = 0 gives a target of 0, refused as not positive either way"),
    ("budget.py", "iters: int = 40", "41", "equivalent: the bisection stops on its relative tolerance after about 17 steps"),
    ("budget.py", "p = make_plan(ctx, groups, r, scores=scores)", "", "equivalent: given the scores make_plan never "
     "reads ctx, and without them it recomputes the same scores (only slower)"),
    ("budget.py", "if hi - lo <= 1e-5 * hi:", "", "gap: only the number of bisection steps (the report's evaluations) "
     "changes, not the plan found; no test pins that count"),
    ("budget.py", "best = min(cands", ">= target.value", "equivalent: the second key matters only when both candidates "
     "are equally far, and then neither equals the target"),
    ("budget.py", 'if abs(info["error"]) > 0.01:', ">= 0.01", "gap: no reachable plan in the tests is exactly 1% off"),
    ("budget.py", "slot < len(node.inputs)", "", "equivalent: an input factor names an input slot the node has "
     "(metrics read its shape there)"),
    ("budget.py", "axis < len(lay)", "<=", "equivalent: a factor's axis is within its value's rank, as is the layout"),
    ("budget.py", "if space is None and v is not None:", "or", "gap: in the tested models a member axis's space is "
     "also the space of its value's layout at that axis"),
    ("budget.py", "fr = cache.get(id(space))", "", "equivalent: the cache only saves recomputing a space's fraction"),
    ("budget.py", "fr = cache[id(space)] = _keep_fraction", "", "equivalent: the cache only saves recomputing a "
     "space's fraction"),
    ("budget.py", "if any(x is None for x in sizes) or not sum(sizes):", "", "gap: no concat with a dynamic or "
     "empty part in the tests"),
    ("budget.py", "return 1.0", "return 2.0", "gap: no concat with a dynamic or empty part in the tests"),
    ("oracle.py", "seed=1)", "", "equivalent: any standard-normal input serves; the seed only makes runs repeatable"),
    ("oracle.py", 'return float("nan")', '"NAN"', "equivalent: float('NAN') is NaN too"),
    ("oracle.py", "zero=True, prune=True, consumer_only=consumer_only", "zero=None", "equivalent: zeroing channels "
     "that the rewrite then removes changes nothing"),
    ("oracle.py", "zero=True, prune=True, consumer_only=consumer_only", "zero=False", "equivalent: zeroing channels "
     "that the rewrite then removes changes nothing"),
    ("oracle.py", "zero=True, prune=True, consumer_only=consumer_only", "(sub, prune=True", "equivalent: zeroing "
     "channels that the rewrite then removes changes nothing"),
    ("oracle.py", "zero=True, prune=True, consumer_only=consumer_only", "prune=True, )", "equivalent: where the "
     "rewrite removes the channels, the side they were zeroed on no longer matters"),
    ("oracle.py", "if not np.isfinite(e) or not np.isfinite(x).all()", "", "equivalent: a NaN or inf in x or y "
     "already makes e NaN or inf (the later checks are a guard)"),
    ("oracle.py", "np.isfinite(np.asarray(x, np.float64)).all() for x in outs", "", "equivalent: runtime outputs are "
     "numeric arrays, finite or not whatever their dtype"),
    ("oracle.py", "if np.isnan(err) and not per_set:", "or not per_set", "equivalent: with per_set off and no NaN, "
     "looking for consumer-side sets again finds none (it only costs runs)"),
    ("oracle.py", "with job.edited({}) as original:", "", "equivalent: edited() with no channels and neither "
     "zeroing nor rewriting yields the original either way"),
    ("oracle.py", "names = compared_values(original, _unquantize_activations(original))", "", "gap: no QDQ model "
     "with non-finite outputs in the tests"),
    ("oracle.py", "err = check_subset(job, gids, keep, batch, consumer_only)", "batch, )", "equivalent here: "
     "consumer_only is still empty at every first check of a set in the tests"),
    ("oracle.py", "_check_set(job, {g.id for g in gs}, plan.keep, batch, consumer_only)", "None", "gap: the "
     "consumer-side retry with per_set off is tested on a model with a static batch"),
    ("oracle.py", "err = check_subset(job, exact, plan.keep, batch, consumer_only)", "None", "gap: the "
     "consumer-side retry with per_set off is tested on a model with a static batch"),
    ("oracle.py", "x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)", "", "equivalent: one float64 "
     "operand already makes the difference float64"),
    ("rewrite.py", "prev = slices[key].get(m.axis)", "", "gap: an internal guard; the analysis gives each (node, "
     "input, axis) one member, so no slice is set twice in the tests"),
    ("rewrite.py", "if prev is not None and not np.array_equal(prev, idx):", "", "gap: an internal guard; the "
     "analysis gives each (node, input, axis) one member, so no slice is set twice in the tests"),
    ("rewrite.py", "conflicting slices for", "", "gap: an internal guard the tests never trigger"),
    ("rewrite.py", "reshape(-1)", "-2", "equivalent: numpy reads any negative size as the unknown one"),
    ("rewrite.py", "reshape(-1)", "reshape(None)", "equivalent: entries are overridden only in 1-D shape "
     "constants, which reshape(None) leaves as they are"),
    ("rewrite.py", "new = new.reshape(shape)", "reshape(None)", "equivalent: entries are overridden only in 1-D "
     "shape constants"),
    ("rewrite.py", "name=name)", "", "equivalent: an initializer is written under its value's name, not its "
     "tensor's"),
    ("rewrite.py", "_sliced(src, sl, en, value.name)", "", "equivalent: an initializer is written under its "
     "value's name, not its tensor's"),
    ("rewrite.py", "tensor = _sliced(src, sl, en, name)", "", "equivalent: an initializer is written under its "
     "value's name, not its tensor's"),
    ("rewrite.py", "v.const_value = ir.Tensor(arr, name=v.name)", "", "equivalent: an initializer is written under "
     "its value's name, not its tensor's"),
    ("rewrite.py", "if en or src.nbytes <= 4096:", "4097", "equivalent: no float tensor has 4097 bytes"),
    ("rewrite.py:apply_plan", "continue", "break", "equivalent: an only use is the value's one spec, nothing "
     "follows it in the loop"),
    ("rewrite.py:zero_removed", "continue", "break", "gap: every member of a tested group carries a removed channel"),
    ("rewrite.py", "used_names.add(name)", "", "equivalent: a new name holds its value's name and use index, so "
     "two new names never coincide"),
    ("rewrite.py", "key=lambda k: (order[k[0]], k[1])", "", "gap: the order of new initializers in the written "
     "file is not pinned"),
    ("rewrite.py", "touched[node.inputs[key[1]]].append(key)", "", "equivalent: only which values are touched is "
     "read, not the keys listed"),
    ("rewrite.py", 'any(m.role == "in" for m in g.tensors)', "", "gap: no group in the tests has only consumer members"),
    ("rewrite.py", "np.broadcast_to(zp, arr.shape)[tuple(idx)].astype(arr.dtype)", "", "equivalent: assigning into "
     "the int array casts anyway"),
    ("__init__.py", "if round_to > 1:", ">= 1", "equivalent: rounding to multiples of 1 (at least one) changes no count"),
    ("__init__.py", 'order = np.argsort(s, kind="stable")[: g.width - 1]', "", "equivalent: only which of a group's "
     "tied top channels stays out of the pool changes, not how many each group loses"),
    ("__init__.py", "cand.sort(key=lambda t: (t[0], t[1], t[2]))", "key=None", "equivalent: the tuples sort by their "
     "fields in order anyway"),
    ("__init__.py", 'kind="stable")', 'kind="STABLE"', "equivalent: numpy reads the sort kind case-insensitively"),
    ("__init__.py", 'key = ("group", g.id)', "", "equivalent: a pool key's label only keeps pools apart"),
    ("__init__.py", 'key = ("set", g.set_name, r)', "", "equivalent: a pool key's label only keeps pools apart"),
    ("__init__.py", 'key = ("cost", r) if pooled else ("set", g.set_name, r)', "set", "equivalent: a pool key's label "
     "only keeps pools apart"),
    ("__init__.py", 'key = ("global", g.kind, r)', "", "equivalent: a pool key's label only keeps pools apart"),
    ("__init__.py", "np.array(sorted(keep), dtype=np.int64)", "", "equivalent: numpy makes Python ints int64 here"),
    ("__init__.py", "return max(vals, default=0.0)", "", "equivalent: vals always holds the default ratio"),
    ("criteria.py:_activation_site", "continue", "break", "gap: a member's node lists its data input before its "
     "constants in the tests, so the site is found before a skipped input"),
    ("criteria.py:_av_site", "continue", "break", "gap: every MatMul output in the tests has a layout"),
    ("criteria.py:magnitude", "continue", "break", "gap: the member without a float constant (a zero point) comes "
     "last in the tests"),
    ("criteria.py:bn_scale", "continue", "break", "gap: no normalisation with a computed (non-constant) scale in "
     "the tests"),
    ("criteria.py", 's = magnitude(ctx, g, "l1", arrays[c])', "", "equivalent: with arrays given, any criterion "
     "but 'l2' sums absolute values without a square root"),
    ("criteria.py", "arrays = _taylor_arrays(proto, calib, {c for c in needs", "", "equivalent: _taylor_arrays computes "
     "both arrays whatever set it is given"),
    ("criteria.py", "mod.zero_grad(set_to_none=True)", "", "equivalent: gradients zeroed instead of dropped add "
     "the same sums"),
    ("criteria.py", "grads[n] += p.grad", "-=", "equivalent: taylor takes the absolute value of w times the summed "
     "gradient, so a negated sum scores the same"),
    ("criteria.py", "fisher[n] += (p.detach() * p.grad) ** 2", "-=", "equivalent: the scores sum absolute values, "
     "so a negated sum scores the same"),
    ("criteria.py", "out[key][n] = a.reshape(tuple(inits[n].dims))", "reshape(None)", "gap: no parameter that "
     "onnx2torch holds in another shape in the tests"),
    ("criteria.py", "needs torch and onnx2torch", "", "gap: torch is installed where the tests run"),
    ("criteria.py", "per = np.abs(np.moveaxis(arr.astype(np.float64), m.axis, 0).reshape(arr.shape[m.axis], -1))",
     "+1", "equivalent: a normalisation scale is 1-D, one entry per channel either way"),
    ("criteria.py", "per = np.abs(np.moveaxis(arr.astype(np.float64), m.axis, 0).reshape(arr.shape[m.axis], -1))",
     "-2", "equivalent: numpy reads any negative size as the unknown one"),
    ("criteria.py", "per = np.abs(np.moveaxis(arr.astype(np.float64), m.axis, 0)", "astype(None)", "gap: float32 "
     "instead of float64 sums stay within the tests' tolerance"),
    ("criteria.py", "arr = ctx.const(m.value)", "", "gap: no normalisation with a computed (non-constant) scale in "
     "the tests"),
    ("criteria.py", "any(v is None or v.const_value is not None for v in node.inputs[:2])", "[:3]",
     "equivalent: a MatMul has two inputs"),
    ("criteria.py", "if not lay:", "", "gap: every MatMul output in the tests has a layout"),
    ("criteria.py", "lm = ctx.table.leaf_map(ctx.layouts[v][ax], g.space, arr.shape[ax])", "", "gap: no activation "
     "site whose axis merges a dynamic dimension with the channels in the tests"),
    ("criteria.py", "raise RuntimeError(f\"cannot separate the batch", "", "gap: the message of an internal check "
     "is not pinned"),
    ("criteria.py", "or arr.ndim <= m.axis:", "arr.ndim < m.axis", "equivalent: a member's axis is within its "
     "tensor's rank"),
    ("criteria.py:_data_scores", 'want[g.id] = "l2"', "", "gap: no group without a site to capture in the tests "
     "(its l2 fallback)"),
    ("criteria.py:_data_scores", 'out.values[g.id] = magnitude(ctx, g, "l2")', "", "gap: no group without a site "
     "to capture in the tests (its l2 fallback)"),
    ("criteria.py", "if arr is None or not np.issubdtype(arr.dtype, np.floating) or arr.ndim <= m.axis:", "",
     "gap: no member without a float constant in the fast selection"),
    ("criteria.py", "to capture; l2 used", "", "gap: no group without a site to capture in the fast selection"),
    ("criteria.py", 'want[g.id] = "l2"', "", "gap: a fallback to l2 the fast selection does not reach"),
    ("criteria.py", 'magnitude(ctx, g, "l2")', "", "gap: a fallback to l2 the fast selection does not reach"),
    ("criteria.py", "ctx.layouts[v][0], g.space, summed.shape[0]", "", "gap: the heads are never axis 0 of the "
     "captured value in the tests"),
    ("criteria.py", "leaf_map(ctx.layouts[v][ax], g.space, summed.shape[ax])", "", "gap: the tested attention gives "
     "the leaf map its width either way"),
    ("criteria.py", "np.where(lm == h)", "", "gap: the GOHSP test has two heads, whose stationary scores are "
     "uniform whatever the vectors"),
    ("criteria.py", "acc.get(g.id, 0) + summed", "", "equivalent: cosine similarity is unchanged when every head "
     "vector is negated"),
    ("criteria.py", "cannot separate the batch", "", "gap: an internal check the tests never trigger"),
    ("criteria.py", 'P.round(8)', "", "gap: the report's P is compared to 1e-6 only"),
    ("criteria.py", "astype(np.float64)", "", "gap: float32 instead of float64 sums stay within the tests' tolerance"),
    ("criteria.py", ".astype(float)", "", "equivalent: numpy divides integer counts into floats anyway"),
    ("criteria.py", "reshape(arr.shape[", "-2", "equivalent: numpy reads any negative size as the unknown one"),
    ("criteria.py", 'np.einsum("ij,ij->i"', "", "equivalent: einsum subscripts in capitals name the same axes"),
    ("criteria.py", "step = max(1, chunk // max(per.shape[1], 1))", "", "equivalent: the chunk size only bounds "
     "memory, any chunking gives the same sums"),
    ("criteria.py", "for i in range(0, per.shape[0], step):", "", "equivalent: the chunk size only bounds memory, "
     "any chunking gives the same sums"),
    ("criteria.py", "if np.abs(s2 - s).sum() <= GOHSP_EPS:", "<", "equivalent: a step exactly at the tolerance "
     "never occurs"),
    ("criteria.py", "sess = exposed(proto, names, threads or 0)", "", "equivalent: the thread count does not change "
     "the captured values"),
    ("criteria.py", "s = lay[ax] if lay and ax < len(lay) else None", "", "equivalent: ax ranges over the layout"),
    ("criteria.py", "if v is None or v.const_value is not None or v not in ctx.layouts:", "", "gap: every tested "
     "group's first member value is a captured activation"),
    ("criteria.py", '("MatMul", "Attention")', "", "gap: no ONNX Attention op in the fast selection"),
    ("criteria.py", 'if node.op_type == "MatMul" and any(', "", "gap: no MatMul with a constant input before the "
     "AV MatMul in the GOHSP test"),
    ("criteria.py", 'g.width, "mean")', "", "gap: each channel appears once per position in the tested layouts, "
     "so mean and sum agree"),
    ("criteria.py", 'how: str = "sum"', "", "equivalent: any value other than 'mean' sums"),
    ("criteria.py", "norms[norms == 0] = 1.0", "", "equivalent: a zero vector divided by any non-zero norm is zero"),
    ("criteria.py", "col[col == 0] = 1.0", "", "equivalent: a zero column divided by any non-zero sum is zero"),
    ("criteria.py", "col = P.sum(0)", "P.sum(1)", "equivalent: the cosine matrix is symmetric"),
    ("criteria.py", "v = head_vectors.astype(np.float64)", "", "equivalent: the head vectors are float64 already"),
    ("criteria.py", "scores += _per_channel(per, lm, g.width)", "scores = ", "gap: no group with two norms in the "
     "fast selection"),
    ("criteria.py", "importance {', '.join(sorted(needs))}", "", "gap: no spec asking two data criteria at once"),
]


def reason(module: str, edit: str, name: str = "") -> str:
    """The reason of the first REASONS entry that fits; an entry's module may name a function too
    (``"rewrite.py:zero_removed"``), matched against the mutant's name."""
    parts = edit.split("`")
    old, new = (parts[1], parts[3]) if len(parts) >= 4 else (edit, "")
    for mod, where, how, why in REASONS:
        mod, _, fn = mod.partition(":")
        if fn and f".x_{fn}__mutmut_" not in name:
            continue
        if module.endswith(mod) and where in old and how in new:
            return why
    return "not reviewed"


def _toml_list(xs) -> str:
    return "[" + ", ".join('"' + x.replace("\\", "\\\\").replace('"', '\\"') + '"' for x in xs) + "]"


def _scratch(module: str, tests: list[str], where: Path) -> Path:
    work = where / module.replace("/", "_").removesuffix(".py")  # not "__init__": pytest would read it as a package
    shutil.copytree(ROOT / "onnxprune", work / "onnxprune", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "tests", work / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    conf = (ROOT / "pyproject.toml").read_text()
    conf += f"""
[tool.mutmut]
source_paths = ["onnxprune"]
only_mutate = {_toml_list([module])}
pytest_add_cli_args = ["-p", "no:logging", "-p", "no:cacheprovider"]
pytest_add_cli_args_test_selection = {_toml_list(tests)}
process_isolation = "forkserver"
use_git_change_detection = false
"""
    (work / "pyproject.toml").write_text(conf)
    return work


def _mutmut(work: Path, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mutmut", *args], cwd=work, capture_output=True, text=True, timeout=timeout)


def _edit(work: Path, name: str) -> str:
    """The mutated line, ``- old`` -> ``+ new``, from ``mutmut show``."""
    diff = _mutmut(work, "show", name).stdout.splitlines()
    minus = [ln[1:].strip() for ln in diff if ln.startswith("-") and not ln.startswith("---")]
    plus = [ln[1:].strip() for ln in diff if ln.startswith("+") and not ln.startswith("+++")]
    if not minus and not plus:
        return "(no diff shown)"
    return f"`{' / '.join(minus)[:150]}` -> `{' / '.join(plus)[:150]}`"


def run_module(module: str, where: Path, max_children: int) -> dict:
    tests = MODULES[module]
    work = _scratch(module, tests, where)
    t0 = time.perf_counter()
    r = _mutmut(work, "run", "--max-children", str(max_children))
    seconds = time.perf_counter() - t0
    res = _mutmut(work, "results", "--all", "true").stdout
    status: dict[str, str] = {}
    for ln in res.splitlines():
        m = re.match(r"\s*(\S+__mutmut_\d+):\s*(.+?)\s*$", ln)
        if m:
            status[m.group(1)] = m.group(2)
    counts: dict[str, int] = {}
    for s in status.values():
        counts[s] = counts.get(s, 0) + 1
    survivors = [(n, _edit(work, n)) for n, s in sorted(status.items()) if s == "survived"]
    return {"module": module, "tests": " ".join(tests), "seconds": seconds, "counts": counts, "survivors": survivors,
            "rc": r.returncode, "log": (r.stdout + r.stderr)[-1500:] if not status else ""}


def _previous(text: str) -> tuple[dict, dict]:
    """Table rows and survivor sections of an existing report, by module."""
    rows, sections, module = {}, {}, None
    for ln in text.splitlines():
        m = re.match(r"\| `([^`]+)` \|", ln)
        if m:
            rows[m.group(1)] = ln
            continue
        m = re.match(r"## `(.+)`: survivors", ln)
        if m:
            module = m.group(1)
            sections[module] = []
        elif ln.startswith("## "):
            module = None
        if module is not None:
            sections[module].append(ln)
    return rows, sections


def write_report(rows: list[dict], note: str) -> None:
    """Rewrites the report; modules not run this time keep their previous row and survivors."""
    old_rows, old_sections = _previous(RESULTS.read_text()) if RESULTS.exists() else ({}, {})
    out = ["# Mutation testing", "",
           "`python tools/mutation.py` (mutmut; each module mutated alone against its targeted fast tests). "
           "Killed: a test failed (or timed out) on the mutant; survived: every selected test passed on it; "
           "no tests: the mutated function is never called by the selected tests, so mutmut does not run them. "
           "Kill rate: killed / all mutants. Equivalent: survivors reviewed as equivalent mutants (a change no "
           "caller can observe); they are not counted as killed.", ""]
    if note:
        out += [note, ""]
    out += ["| module | tests | mutants | killed | survived | no tests | other | kill rate | equivalent | minutes |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    new = {r["module"]: r for r in rows}
    for mod in MODULES:
        r = new.get(mod)
        if r is None:
            if mod in old_rows:
                out.append(old_rows[mod])
            continue
        c = dict(r["counts"])
        total = sum(c.values())
        killed = c.pop("killed", 0) + c.pop("timeout", 0)
        survived = c.pop("survived", 0)
        no_tests = c.pop("no tests", 0)
        other = ", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "0"
        equiv = sum(1 for n, e in r["survivors"] if reason(mod, e, n).startswith("equivalent"))
        rate = f"{100 * killed / total:.1f}%" if total else "-"
        out.append(f"| `{mod}` | `{r['tests']}` | {total} | {killed} | {survived} | {no_tests} | {other} | {rate} | {equiv} | "
                   f"{r['seconds'] / 60:.1f} |")
    for mod in MODULES:
        r = new.get(mod)
        if r is None:
            if mod in old_sections:
                out += [""] + old_sections[mod]
            continue
        out += ["", f"## `{mod}`: survivors", ""]
        if r["log"]:
            out += ["mutmut produced no results:", "", "```", r["log"], "```"]
        if not r["survivors"]:
            out.append("none" if not r["log"] else "")
        for name, edit in r["survivors"]:
            out.append(f"- `{name}`: {edit}. {reason(mod, edit, name)}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(ln for ln in out).rstrip() + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("modules", nargs="*", help=f"modules to mutate (default: all of {', '.join(MODULES)})")
    ap.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--note", default="", help="a line for the report (e.g. which modules were left out and why)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch copies (to `mutmut show` / `browse` there)")
    ap.add_argument("--reasons-only", action="store_true", help="re-apply REASONS to the survivors of the existing report, no run")
    args = ap.parse_args(argv)
    if args.reasons_only:
        module, lines = "", []
        for ln in RESULTS.read_text().splitlines():
            m = re.match(r"## `(.+)`: survivors", ln)
            module = m.group(1) if m else module
            m = re.match(r"(- `[^`]+`: )(.+)\. ([^.]*|not reviewed)$", ln) if ln.startswith("- `") else None
            lines.append(f"{m.group(1)}{m.group(2)}. {reason(module, m.group(2), m.group(1)[3:-3])}" if m else ln)
        equiv: dict[str, int] = {}
        module = ""
        for ln in lines:  # recount the equivalent column
            m = re.match(r"## `(.+)`: survivors", ln)
            module = m.group(1) if m else module
            if ln.startswith("- `") and re.search(r"\. equivalent[^.]*$", ln):
                equiv[module] = equiv.get(module, 0) + 1
        for i, ln in enumerate(lines):
            m = re.match(r"\| `([^`]+)` \|", ln)
            cells = ln.split(" | ")
            if m and len(cells) == 10:
                cells[8] = str(equiv.get(m.group(1), 0))
                lines[i] = " | ".join(cells)
        RESULTS.write_text("\n".join(lines) + "\n")
        return 0
    mods = args.modules or list(MODULES)
    unknown = [m for m in mods if m not in MODULES]
    if unknown:
        ap.error(f"no test selection for {unknown}; known: {list(MODULES)}")
    where = Path(tempfile.mkdtemp(prefix="onnxprune-mutation-"))
    try:
        rows = []
        for m in mods:
            print(f"mutating {m} ...", flush=True)
            rows.append(run_module(m, where, args.max_children))
            print(f"  {rows[-1]['counts']} in {rows[-1]['seconds'] / 60:.1f} min", flush=True)
        note = args.note
        write_report(rows, note)
    finally:
        if args.keep:
            print("scratch copies in", where)
        else:
            shutil.rmtree(where, ignore_errors=True)
    print("wrote", RESULTS.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
