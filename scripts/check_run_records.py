"""Check that run records say the numbers were computed as a check meant them to be.

    python scripts/check_run_records.py [--min N] --expect FIELD=VALUE [--expect ...] RECORD [RECORD ...]

FIELD is a dotted path inside the record's "compute" facts (tu_lib.core.compute_facts), e.g. cpu_capability=AVX2 or
model_dtypes.organism=bfloat16 (a list of dtypes must be exactly [VALUE]). `make test-other-cpu` and `make test-bf16`
use it so that an emulation or a forced dtype that did not reach the notebooks' kernels fails loudly.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def field(facts: dict, path: str):
    value = facts
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min", type=int, default=1, help="at least this many records must exist")
    parser.add_argument("--expect", action="append", required=True, metavar="FIELD=VALUE", help="a fact every record must have")
    parser.add_argument("records", nargs="*", help="run_record.json files")
    args = parser.parse_args(argv)
    expect = args.expect
    if any("=" not in e for e in expect):
        parser.error(f"--expect takes FIELD=VALUE, got {expect}")
    records = [Path(r) for r in args.records if Path(r).is_file()]
    if len(records) < args.min:
        print(f"only {len(records)} run records found, expected at least {args.min}: did the notebooks run?", file=sys.stderr)
        return 1
    bad = []
    for path in records:
        facts = json.loads(path.read_text()).get("compute") or {}
        for pair in expect:
            name, want = pair.split("=", 1)
            got = field(facts, name)
            if got != want and got != [want]:
                bad.append(f"{path}: compute.{name} is {got!r}, not {want!r}")
    print(f"run records checked: {len(records)}; " + ", ".join(expect) + (" in every one" if not bad else ""))
    for line in bad:
        print(line, file=sys.stderr)
    if bad:
        print("these runs were not computed the way the check requires, so its result would prove nothing: see the "
              "environment variables the make target sets (and that nothing in the notebooks overrides them).", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
