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
    "onnxprune/core/metrics.py": ["tests/test_budget_bench.py", "-k", "count or estimate or target"],
    "onnxprune/plan/budget.py": ["tests/test_budget_bench.py", "-k", "count or estimate or target or parse"],
    "onnxprune/plan/importance/criteria.py": ["tests/test_importance.py", "tests/test_scopes.py", "-k",
                                              "by_hand or hand_matrix or spec_validation or scope or fixture"],
    "onnxprune/rewrite.py": ["tests/test_rules.py", "tests/test_budget_bench.py", "-k", "not every_rule and not bench"],
    "onnxprune/validate/oracle.py": ["tests/test_rules.py", "-k", "oracle or conv_relu_conv or attention or qdq"],
}

# why a mutant survives (an equivalent mutant, or a gap the selected tests leave), reviewed by hand:
# (module, substring of the ORIGINAL line, substring of the mutated line or "", reason); first match wins.
# Mutant numbers change with every edit of a module, so reasons are keyed by the code they mutate.
REASONS: list[tuple[str, str, str, str]] = [
    ("metrics.py", 'q[:-1]), None), Factor(k_[-2]', "", "ONNX Attention op, 3-D form: "
     "not in the budget selection (no test holds its MACs)"),
    ("metrics.py", 'qk = _axes(q, "in", 0, [0, 1, 2])', "", "ONNX Attention op (opset 23) terms: not in the budget selection (no test holds its MACs)"),
    ("metrics.py", 'tuple(qk + _axes(', "", "ONNX Attention op (opset 23) terms: not in the budget selection (no test holds its MACs)"),
    ("metrics.py", "if q and k_ and v", "", "ONNX Attention (opset 23): not in the budget selection"),
    ("metrics.py", "q, k_, v = (shapes.get(x)", "", "ONNX Attention (opset 23): not in the budget selection"),
    ("metrics.py", 'elif n.op_type == "Attention"', "", "ONNX Attention (opset 23): not in the budget selection"),
    ("metrics.py", "_ms_terms(k, n, shapes, inits)", "", "com.microsoft fused ops: counted in test_ort_fused, not in this selection"),
    ("metrics.py", 'n.domain == "com.microsoft"', "", "com.microsoft fused ops: not in this selection"),
    ("metrics.py", "QUANTIZED.get(", "", "ConvInteger / QLinear ops: counted in test_foreign, not in this selection"),
    ("metrics.py", '_axes(y, "out", 0)', '_axes(y, None', "equivalent: the estimator reads any ref other than 'in'/'x' as an output axis"),
    ("metrics.py", '_axes(y, "out", 0)', '"XXoutXX"', "equivalent: the estimator reads any ref other than 'in'/'x' as an output axis"),
    ("metrics.py", '_axes(y, "out", 0)', '"OUT"', "equivalent: the estimator reads any ref other than 'in'/'x' as an output axis"),
    ("metrics.py", "if a and y:", "", "equivalent here: every Gemm/MatMul in the tests has inferred shapes"),
    ("metrics.py", "if w and y and x:", "", "equivalent here: every Conv in the tests has inferred shapes"),
    ("metrics.py", "len(n.input) > wslot", "", "equivalent: a Conv always has its weight input"),
    ("metrics.py", 'else 1 for d in dims]', "", "equivalent here: no symbolic dim is left after the batch is set to 1"),
    ("metrics.py", "prod(t.dims) > 1", "> 2", "gap: no float weight of exactly two elements in the selected models"),
    ("metrics.py", "a, y = shapes.get(n.input[0])", "n.input[1]", "gap: B's dim at that index equals A's contracted width "
     "whenever transA != transB, as in every tested Gemm (none has transA == transB)"),
    ("metrics.py", 'at.name == "transA"), 0)', "), None)", "equivalent: a missing transA reads as false either way"),
    ("metrics.py", '_axes(a, "in", 0, [0 if trans_a', '_axes(a, "in", 1,', "equivalent when B is a weight: the estimator "
     "finds B's contracted axis, which the analysis tied to A's"),
    ("budget.py", "log.warning(", "", "equivalent for the tests: the warning's text and arguments are not asserted"),
    ("budget.py", "_keep_fraction(t, c, keep) * c.size for c in r.children", "", "gap: no concat space (Concat/Split) "
     "is pruned in the budget selection"),
    ("budget.py", "if any(x is None for x in sizes) or not sum(sizes)", "", "gap: no concat space in the budget selection"),
    ("budget.py", '"%": None, "G": 1e9, "M": 1e6, "K": 1e3', "", "gap: parse_target is tested with %, K, M and plain "
     "numbers, not G or lower-case suffixes"),
    ("budget.py", 'raise RuntimeError("estimator: node lists differ")', "", "equivalent for the tests: an internal "
     "consistency check that never fires"),
    ("budget.py", '"metric": m,', "", "gap: the info fields the report prints are not all asserted"),
    ("budget.py", '"target": target.value,', "", "gap: the info fields the report prints are not all asserted"),
    ("budget.py", '"scale": s,', "", "gap: the info fields the report prints are not all asserted"),
    ("budget.py", '"requested": target.requested,', "", "gap: the info fields the report prints are not all asserted"),
]


def reason(module: str, edit: str) -> str:
    parts = edit.split("`")
    old, new = (parts[1], parts[3]) if len(parts) >= 4 else (edit, "")
    for mod, where, how, why in REASONS:
        if module.endswith(mod) and where in old and how in new:
            return why
    return "not reviewed"


def _toml_list(xs) -> str:
    return "[" + ", ".join('"' + x.replace("\\", "\\\\").replace('"', '\\"') + '"' for x in xs) + "]"


def _scratch(module: str, tests: list[str], where: Path) -> Path:
    work = where / Path(module).stem
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


def write_report(rows: list[dict], note: str) -> None:
    out = ["# Mutation testing", "",
           "`python tools/mutation.py` (mutmut; each module mutated alone against its targeted fast tests). "
           "Killed: a test failed (or timed out) on the mutant; survived: every selected test passed on it; "
           "no tests: the mutated function is never called by the selected tests, so mutmut does not run them "
           "(for metrics.py: the com.microsoft fused-op terms, counted in test_ort_fused).", ""]
    if note:
        out += [note, ""]
    out += ["| module | tests | mutants | killed | survived | other | minutes |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        c = dict(r["counts"])
        killed = c.pop("killed", 0) + c.pop("timeout", 0)
        survived = c.pop("survived", 0)
        other = ", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "0"
        out.append(f"| `{r['module']}` | `{r['tests']}` | {sum(r['counts'].values())} | {killed} | {survived} | {other} | "
                   f"{r['seconds'] / 60:.1f} |")
    for r in rows:
        out += ["", f"## `{r['module']}`: survivors", ""]
        if r["log"]:
            out += ["mutmut produced no results:", "", "```", r["log"], "```"]
        if not r["survivors"]:
            out.append("none" if not r["log"] else "")
        for name, edit in r["survivors"]:
            out.append(f"- `{name}`: {edit}. {reason(r['module'], edit)}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(out).rstrip() + "\n")


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
            lines.append(f"{m.group(1)}{m.group(2)}. {reason(module, m.group(2))}" if m else ln)
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
        note = args.note or ("" if set(mods) == set(MODULES) else
                             f"Run on {', '.join(f'`{m}`' for m in mods)} only; the other modules are configured but were not run.")
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
