"""Session-wide test plumbing.

Rule coverage: every rule dispatched by the analysis (the registry's lookup
found it for a node) is recorded with the test file that made it run, so
``test_rules.py::test_every_rule_has_a_small_graph_test`` checks which rules
actually ran in the small-graph tests, rule by rule (domain, op and opset
range), instead of searching the tests' text. That test is moved to the end
of the session; when the session did not run every small-graph test (a
``-k`` selection, the test alone), it runs them in a subprocess to find out.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest

from onnxprune.core.registry import DEFAULT_DOMAINS, Registry

RULE_TEST_FILES = ("test_rules.py", "test_ort_fused.py")
COVERAGE_TEST = "test_every_rule_has_a_small_graph_test"
LOG_ENV = "ONNXPRUNE_TEST_RULE_LOG"  # set by the subprocess fallback: where to write what ran


class _RuleLog:
    def __init__(self) -> None:
        self.current: str | None = None  # test file of the test being run
        self.dispatched: set[tuple[str, str, int]] = set()  # (domain, op, since) of rules run by RULE_TEST_FILES
        self.done: set[str] = set()  # node ids of tests run to the end
        self.original = Registry.lookup

    def lookup(self, registry: Registry, domain: str, op_type: str, opset: int):
        fn = self.original(registry, domain, op_type, opset)
        if fn is not None and self.current in RULE_TEST_FILES:
            d = "" if domain in DEFAULT_DOMAINS else domain
            for e in registry.entries():
                if e.domain == d and e.op_type == op_type and e.covers(opset):
                    self.dispatched.add((e.domain, e.op_type, e.since))
        return fn


_LOG = _RuleLog()


def pytest_configure(config):
    log = _LOG
    Registry.lookup = lambda self, domain, op_type, opset: log.lookup(self, domain, op_type, opset)


def pytest_unconfigure(config):
    Registry.lookup = _LOG.original
    path = os.environ.get(LOG_ENV)
    if path:
        with open(path, "w") as f:
            json.dump(sorted(_LOG.dispatched), f)


def pytest_collection_modifyitems(session, config, items):
    last = [it for it in items if it.name == COVERAGE_TEST]
    items[:] = [it for it in items if it.name != COVERAGE_TEST] + last


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _LOG.current = item.path.name


def pytest_runtest_logreport(report):
    if report.when == "teardown":
        _LOG.done.add(report.nodeid)
        _LOG.current = None


@pytest.fixture
def rule_dispatches(request):
    """A function returning ``{(domain, op, since)}``: every rule the small-graph tests ran."""

    def get() -> set[tuple[str, str, int]]:
        wanted = [it.nodeid for it in request.session.items if it.path.name in RULE_TEST_FILES and it.name != COVERAGE_TEST]
        files = {it.path.name for it in request.session.items if it.path.name in RULE_TEST_FILES}
        if set(files) == set(RULE_TEST_FILES) and wanted and all(n in _LOG.done for n in wanted):
            return set(_LOG.dispatched)
        here = os.path.dirname(os.path.abspath(__file__))
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rules.json")
            r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:logging",
                                *[os.path.join(here, f) for f in RULE_TEST_FILES], "-k", f"not {COVERAGE_TEST}"],
                               cwd=os.path.dirname(here), env={**os.environ, LOG_ENV: out}, capture_output=True, text=True)
            assert os.path.exists(out), r.stdout[-3000:] + r.stderr[-3000:]
            with open(out) as f:
                return {tuple(x) for x in json.load(f)}

    return get
