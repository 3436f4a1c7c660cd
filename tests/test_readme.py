"""Every command the README shows runs as written.

The README is read, not copied: its indented command lines, its Python block
and its inline `onnxprune ...` / `python tools/...` commands are collected, and
a meta-test fails when one appears that no test below runs. Usage lines with
placeholders (MODEL.onnx, ratios.json, DIR...) run with tiny stand-ins for the
placeholders and without their [optional] parts; the tools' commands are parsed
by the tools' own argument parsers (running them takes from minutes to an hour)."""
from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DEFAULT_MODEL = ROOT / "onnxprune" / "data" / "default_resnet.onnx"


def indented_commands() -> list[str]:
    """Lines of indented code blocks that start a shell command."""
    out = []
    for line in README.splitlines():
        if line.startswith("    ") and not line.startswith("     "):
            text = line.strip()
            if re.match(r"(onnxprune |python3? |\.venv/)", text):
                out.append(text)
    return out


def inline_commands() -> list[str]:
    return [m for m in re.findall(r"`((?:onnxprune |python tools/)[^`]*)`", README)]


def python_block() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert len(blocks) == 1
    return blocks[0]


# -- the stand-ins ------------------------------------------------------------------------------

def _images_model(path: Path) -> None:
    """Conv(3->8) -> Relu -> Conv(8->4) on an input named 'images' [N, 3, H, W] (dynamic H, W)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (8, 3, 3, 3)), ("w2", (4, 8, 1, 1)))]
    nodes = [helper.make_node("Conv", ["images", "w1"], ["a"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"])]
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _photos(folder: Path, n: int = 40, size: int = 128) -> None:
    from PIL import Image

    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(str(folder / f"p{i:02d}.png"))


@pytest.fixture
def stage(tmp_path, monkeypatch):
    """A working folder holding a stand-in for every placeholder; the CLI runs there."""
    monkeypatch.chdir(tmp_path)
    for name in ("MODEL.onnx", "model.onnx", "A.onnx", "B.onnx", "ORIGINAL.onnx"):
        shutil.copy(DEFAULT_MODEL, tmp_path / name)
    (tmp_path / "ratios.json").write_text('{"default": 0.5}')
    (tmp_path / "R").write_text('{"default": 0.5}')
    assert main(["MODEL.onnx", "--ratios", "ratios.json", "-o", "PRUNED.onnx", "--save-plan", "plan.json", "-q"]) == 0
    _photos(tmp_path / "photos")
    return tmp_path


def _strip_optional(text: str) -> str:
    """Drop [optional] parts (nested) and a trailing # comment."""
    text = text.split("  #")[0]
    prev = None
    while prev != text:
        prev, text = text, re.sub(r"\[[^\[\]]*\]", "", text)
    return text


def argv_of(line: str, subs: dict[str, str]) -> list[str]:
    """The arguments of a usage line without its optional parts, the first of
    each `a|b` alternative, and placeholders replaced."""
    toks = shlex.split(_strip_optional(line))
    assert toks[0] == "onnxprune"
    out, skip = [], 0
    for t in toks[1:]:
        if skip:
            skip -= 1
            continue
        if t == "|":  # `--ratios R | --plan P`: keep the first alternative
            skip = 2
            continue
        if "|" in t and not t.startswith("{"):
            t = t.split("|")[0]
        out.append(subs.get(t, t))
    return out


README_RECOVER = "onnxprune model.onnx --ratios '{\"target_macs\": 0.9}' --calib photos/ --recover -o pruned.onnx"
FAST_SUBS = {"DIR": "photos", "VIT.onnx": "model.onnx", "images:N,3,640,640": "images:N,3,64,64"}


def _usage_lines() -> list[str]:
    return [c for c in indented_commands() if c.startswith("onnxprune ") and c != README_RECOVER]


def _usage_id(line: str) -> str:
    toks = line.split()
    if toks[1] == "bench" and "--table" in toks:
        return "bench:table-model" if any(t.endswith(".onnx") for t in toks) else "bench:table"
    return toks[1] if toks[1] in ("analyze", "verify", "export", "bench", "finetune", "data", "gohsp") else \
        "prune:" + ("plan" if "--plan" in toks[2:4] else "calib" if "--calib" in line else
                    "input-shape" if "--input-shape" in line else "latency" if "target_latency" in line else "ratios")


USAGE = {_usage_id(c): c for c in _usage_lines()}
FAST_USAGE = ["prune:ratios", "prune:plan", "prune:calib", "prune:input-shape", "prune:latency", "bench:table",
              "bench:table-model", "analyze", "verify", "bench"]
SLOW_USAGE = ["export", "finetune", "data", "gohsp"]


# -- the meta-test ------------------------------------------------------------------------------

def test_every_readme_command_is_run_by_a_test():
    cmds = indented_commands() + inline_commands()
    assert len(cmds) >= 15  # the parser still finds the README's commands
    covered = set()
    for c in cmds:
        if c.startswith("python3 -m venv"):
            covered.add(c)  # the set-up lines: the first is test_the_first_command_..., the second is CI itself
        elif c.startswith("python tools/"):
            assert c.split()[1] in TOOLS, f"README shows a tool command no test parses: {c}"
            covered.add(c)
        elif c.startswith(".venv/bin/python -m pytest"):
            covered.add(c)  # this suite
        elif c in USAGE.values() or c == README_RECOVER or c.startswith("onnxprune finetune PRUNED.onnx --data DIR|"):
            covered.add(c)
        elif c.startswith("onnxprune verify") or c.startswith("onnxprune gohsp"):
            covered.add(c)  # inline names of subcommands, run by their usage lines
    missing = [c for c in cmds if c not in covered]
    assert not missing, f"README commands that no test runs: {missing}"
    assert sorted(USAGE) == sorted(FAST_USAGE + SLOW_USAGE), sorted(USAGE)


# -- the commands -------------------------------------------------------------------------------

def test_the_first_command_runs_the_default_job(tmp_path, monkeypatch, capsys):
    first = indented_commands()[0]
    assert first.endswith("&& .venv/bin/onnxprune")  # no arguments
    monkeypatch.chdir(tmp_path)
    assert main([]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("PASSED |")
    assert (tmp_path / "default_resnet.pruned.onnx").exists()


def test_the_python_block_runs_as_written(stage):
    code = python_block()
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    assert (stage / "pruned.onnx").exists()
    assert ns["res"].after["macs"] < ns["res"].before["macs"]


def _run_usage(stage, key: str, capsys, subs) -> tuple[list[str], int, str, str]:
    """Runs the usage line ``key``; returns its argv, exit status, stdout and stderr."""
    argv = argv_of(USAGE[key], subs)
    if key == "prune:input-shape":
        _images_model(stage / "MODEL.onnx")
    if key == "bench:table":  # a table left by a target_latency run
        assert main(["MODEL.onnx", "--ratios", '{"target_latency": 0.8}', "-o", "lat.onnx", "--latency-table", "lat.json",
                     "--runs", "3", "--warmup", "1", "-q"]) == 0
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    return argv, rc, out, err


@pytest.mark.parametrize("key", FAST_USAGE)
def test_usage_line_runs(stage, capsys, key):
    argv, rc, out, err = _run_usage(stage, key, capsys, FAST_SUBS)
    assert rc == 0, (argv, err)
    assert out.strip().splitlines()[-1].startswith("PASSED |"), out
    if "-o" in argv:  # the file the line asks for is written
        assert (stage / argv[argv.index("-o") + 1]).exists(), argv


def test_the_recovery_example_runs_as_written(stage, capsys):
    assert README_RECOVER in indented_commands()
    rc = main(shlex.split(README_RECOVER)[1:])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "held-out" in out + err
    assert (stage / "pruned.onnx").exists()


@pytest.mark.slow
@pytest.mark.parametrize("key", SLOW_USAGE)
def test_slow_usage_line_runs(stage, capsys, key):
    pytest.importorskip("torch")
    pytest.importorskip("timm")
    pytest.importorskip("onnx2torch")
    subs = dict(FAST_SUBS)
    if key == "data":
        subs["DIR"] = "new_data"  # the command makes the folder
    if key in ("finetune", "gohsp"):
        assert main(["data", "synthetic", "data", "--train", "7", "--val", "2", "--size", "32", "-q"]) == 0  # per class: 70
        subs["DIR"] = "data"
        if key == "gohsp":
            assert main(["export", "timm:vit_tiny_patch16_224", "-o", "model.onnx", "--img-size", "32",
                         "--num-classes", "10", "-q"]) == 0
    argv, rc, out, err = _run_usage(stage, key, capsys, subs)
    assert rc == 0, (argv, err)
    assert out.strip().splitlines()[-1].startswith("PASSED |"), out
    made = argv[argv.index("-o") + 1] if "-o" in argv else subs["DIR"] if key == "data" else None
    assert made is None or (stage / made).exists(), argv


# -- the tools' commands ------------------------------------------------------------------------

TOOLS = {"tools/pretrained_recovery.py", "tools/recover_speed.py", "tools/latency_budget.py", "tools/latency_agreement.py",
         "tools/bn_collapse.py", "tools/attention_recovery.py", "tools/recover_zoo.py", "tools/pretrained_ocr.py",
         "tools/pretrained_vit.py", "tools/pretrained_text.py", "tools/foreign_table.py", "tools/qdq_recovery.py",
         "tools/torchvision_table.py"}


def _tool(path: str):
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(ROOT / "tools"))
    return mod


@pytest.mark.parametrize("cmd", [c for c in inline_commands() if c.startswith("python tools/")])
def test_tool_commands_parse_with_the_tools_own_parser(cmd):
    toks = shlex.split(cmd)
    mod = _tool(toks[1])
    args = mod.parser().parse_args(toks[2:])  # an unknown flag or a bad value exits here
    if hasattr(args, "configs"):
        assert set(args.configs.split(",")) <= set(mod.CONFIGS)
        assert all(0 < float(t) <= 1 for t in args.targets.split(","))
    if hasattr(args, "models"):
        timm = pytest.importorskip("timm")
        assert all(timm.is_model(m) or m in getattr(mod, "LOCAL_MODELS", {}) for m in args.models.split(","))
