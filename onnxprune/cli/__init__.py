"""Command line: ``onnxprune MODEL --ratios R -o OUT`` and subcommands.

    onnxprune                                   prune the built-in default model
    onnxprune MODEL --ratios R -o OUT [--report REP] [--verify]
    onnxprune analyze MODEL [--json F]
    onnxprune verify MODEL --ratios R
    onnxprune export timm:NAME -o OUT [--exporter dynamo|legacy] [--opset N] [--dynamic-batch] [--checkpoint F]
    onnxprune bench MODEL [MORE ...] [--batch N] [--provider cpu|cuda|tensorrt] [--threads N] [--warmup N] [--runs N] [--json F] [--plot F.png]
    onnxprune finetune | gohsp | data ...       training (the ``finetune`` extra)

Each command is a module of its own (``prune``, ``analyze``, ...) that defines
``NAME``, ``parser()`` and ``run(args)``, listed once in ``COMMANDS``; ``common``
holds what they share. This module only dispatches and prints the verdict line.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
import time

from onnxprune.cli.common import Failed, check_output_folders
from onnxprune.errors import UserError

log = logging.getLogger("onnxprune")

# every command, in the order ``onnxprune -h`` lists them: onnxprune.cli.NAME, imported only when it runs
COMMANDS = ("analyze", "verify", "export", "prune", "bench", "finetune", "gohsp", "data")
DEFAULT = "prune"  # the command of ``onnxprune MODEL ...`` (no command word)


def command_module(name: str):
    """The module of one command: ``NAME``, ``parser()``, ``run(args)``."""
    return importlib.import_module(f"onnxprune.cli.{name}")


class _Stderr(logging.Handler):
    """Plain messages to whatever ``sys.stderr`` is when a record is emitted."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


def _setup_logging(args) -> None:
    """Our own messages (the ``onnxprune`` logger) at the level the flags ask for. The
    root logger is left alone: other libraries' INFO chatter (the torch exporter logs
    every initializer it deduplicates) stays out, their warnings show as usual."""
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        h = _Stderr()
        h.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(h)
    log.propagate = False
    log.setLevel(logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO)


def _verdict(status: str, what: str, argv: list[str], code: int = 0) -> int:
    print(f"{status} | Runtime: {time.perf_counter() - _T0:.1f}s | {what} | Command: onnxprune {' '.join(argv)}".rstrip())
    return code


_T0 = time.perf_counter()


def _model_error(args) -> str | None:
    """After an internal error: when onnxruntime cannot run the input model either,
    the file is at fault, and that is the one line to show."""
    from onnxprune.cli.common import shapes
    from onnxprune.api import model_run_error

    model = getattr(args, "model", None)
    if not isinstance(model, str) or not os.path.isfile(model):
        return None
    try:
        why = model_run_error(model, shapes(args))
    except UserError as e:
        return str(e)
    except Exception:
        return None
    return f"the model does not run in onnxruntime either: {why}" if why else None


def main(argv: list[str] | None = None) -> int:
    global _T0
    _T0 = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    command = list(argv)  # as given, for the verdict line
    cmd = command_module(argv.pop(0) if argv and argv[0] in COMMANDS else DEFAULT)
    args = cmd.parser().parse_args(argv)
    args.t0 = _T0
    _setup_logging(args)
    try:
        if getattr(cmd, "CHECK_OUTPUT_FOLDERS", True):  # False for data: its output is a folder it creates
            check_output_folders(args)
        msg = cmd.run(args)
    except Failed as e:
        return _verdict("FAILED", str(e), command, e.code)
    except UserError as e:
        print(f"onnxprune: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("onnxprune: interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except Exception as e:  # never a traceback for a file that loads: one line, exit 1 (-v shows it)
        if args.verbose:
            log.exception("internal error")
        why = _model_error(args)
        if why:
            print(f"onnxprune: error: {why}", file=sys.stderr)
            return 1
        text = " ".join(str(e).split())[:400]
        print(f"onnxprune: error: {type(e).__name__}: {text} (this is a bug in onnxprune; -v shows where)", file=sys.stderr)
        return 1
    return _verdict("PASSED", msg, command)


if __name__ == "__main__":
    raise SystemExit(main())
