"""Command line: ``onnxprune MODEL --ratios R -o OUT`` and subcommands.

    onnxprune                                   prune the built-in default model
    onnxprune MODEL --ratios R -o OUT [--report REP] [--verify]
    onnxprune analyze MODEL [--json F]
    onnxprune verify MODEL --ratios R
    onnxprune export timm:NAME -o OUT [--exporter dynamo|legacy] [--opset N] [--dynamic-batch] [--checkpoint F]
    onnxprune bench MODEL [MORE ...] [--batch N] [--provider cpu|cuda|tensorrt] [--threads N] [--warmup N] [--runs N] [--json F] [--plot F.png]
    onnxprune finetune | gohsp | data ...       training (the ``finetune`` extra)

``common`` holds the parsers; ``prune``, ``tools`` and ``train`` the commands; this
module only dispatches and prints the verdict line.
"""
from __future__ import annotations

import logging
import sys
import time

from onnxprune.cli.common import SUBCOMMANDS, Failed, prune_parser, sub_parsers
from onnxprune.errors import UserError

log = logging.getLogger("onnxprune")


def _setup_logging(args) -> None:
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    # root stays at WARNING so that other libraries' INFO chatter (the torch exporter's
    # optimiser logs every initializer it deduplicates) does not drown our progress lines
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s", stream=sys.stderr)
    log.setLevel(level)


def _verdict(status: str, what: str, code: int = 0) -> int:
    print(f"{status} | Runtime: {time.perf_counter() - _T0:.1f}s | {what} | Command: onnxprune {' '.join(sys.argv[1:])}".rstrip())
    return code


_T0 = time.perf_counter()


def main(argv: list[str] | None = None) -> int:
    global _T0
    _T0 = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    from onnxprune.cli import prune, tools, train

    commands = {"analyze": prune.cmd_analyze, "verify": prune.cmd_verify, "prune": prune.cmd_prune, "export": tools.cmd_export,
                "bench": tools.cmd_bench, "finetune": train.cmd_finetune, "data": train.cmd_data, "gohsp": train.cmd_gohsp}
    if argv and argv[0] in SUBCOMMANDS:
        sub = argv.pop(0)
        parser = prune_parser() if sub == "prune" else sub_parsers()[sub]
        fn = commands[sub]
    else:
        parser, fn = prune_parser(), prune.cmd_prune
    args = parser.parse_args(argv)
    args.t0 = _T0
    _setup_logging(args)
    try:
        msg = fn(args)
    except Failed as e:
        return _verdict("FAILED", str(e), e.code)
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
        text = " ".join(str(e).split())[:400]
        print(f"onnxprune: error: {type(e).__name__}: {text} (this is a bug in onnxprune; -v shows where)", file=sys.stderr)
        return 1
    return _verdict("PASSED", msg)


if __name__ == "__main__":
    raise SystemExit(main())
