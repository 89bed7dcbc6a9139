"""``gate`` command line: one sub-command per module in :mod:`gate.commands`.

Exit codes: :data:`gate.decision.EXIT_CODES` (0 accept, 1 reject, 2 error, 3 review; fail closed) and
:data:`gate.decision.EXIT_USAGE` (4, usage error), the gate's one table.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from gate import __version__
from gate.decision import EXIT_CODES, EXIT_USAGE
from gate.errors import GateError, UsageError

EXIT_ERROR = EXIT_CODES["error"]

COMMANDS = ("scan", "synth", "run", "run-many", "verify", "inspect", "proxy", "calibrate")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse exits 2; usage errors are 4 here
        self.print_usage(sys.stderr)
        print(f"gate: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gate", description="Black-box backdoor detection gate for ONNX image classifiers.")
    parser.add_argument("--version", action="version", version=f"gate {__version__}")
    parser.add_argument("--debug", action="store_true", help="print tracebacks of unexpected errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"gate.commands.{name.replace('-', '_')}")
        except ModuleNotFoundError as exc:
            if exc.name != f"gate.commands.{name.replace('-', '_')}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = ["gate", *map(str, sys.argv[1:] if argv is None else argv)]  # for the attestation
    try:
        return int(args.handler(args))
    except UsageError as exc:
        print(f"gate: usage error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except GateError as exc:
        print(f"gate: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("gate: interrupted", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # a bug: one line and the error code, the traceback only with --debug
        if args.debug:
            raise
        print(f"gate: internal error: {type(exc).__name__}: {exc} (run with gate --debug for the traceback)",
              file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
