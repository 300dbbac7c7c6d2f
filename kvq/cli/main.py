"""``kvq`` entry point: dispatches to one module per subcommand.

Bad input exits with status 2 and a one-line reason on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from kvq.errors import KVQError

#: subcommand -> module with ``add_parser(subparsers)`` and ``run(args) -> int``
SUBCOMMANDS = {
    "list": "kvq.cli.list_cmd",
    "explain": "kvq.cli.explain",
    "validate": "kvq.cli.validate",
    "schema": "kvq.cli.schema",
    "compare": "kvq.cli.compare",
    "calibrate": "kvq.cli.calibrate",
    "diagnose": "kvq.cli.diagnose",
    "tune": "kvq.cli.tune",
    "export": "kvq.cli.export",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other kvq input error
        self.print_usage(sys.stderr)
        print(f"kvq: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kvq", description="KV-cache quantization pipelines: list, explain, "
                     "validate and compare them.",
                     epilog="Quote specs in the shell: kvq explain 'nsep>pchan>int4'")
    from kvq import __version__

    parser.add_argument("--version", action="version", version=f"kvq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for module in SUBCOMMANDS.values():
        try:
            importlib.import_module(module).add_parser(sub)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except KVQError as err:
        print(f"kvq {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `kvq schema | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("kvq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
