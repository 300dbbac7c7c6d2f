"""``kvq schema``: the JSON schema of pipeline files (for editors and validators)."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("schema", help="print the JSON schema of KVConfig / Pipeline files")
    p.add_argument("--pipeline", action="store_true", help="schema of one pipeline instead")
    p.set_defaults(run=run)


def run(args) -> int:
    import json

    from kvq.spec.schema import json_schema

    print(json.dumps(json_schema("pipeline" if args.pipeline else "kvconfig"), indent=2))
    return 0
