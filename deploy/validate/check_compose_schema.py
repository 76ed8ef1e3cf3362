#!/usr/bin/env python3
"""deploy/compose/compose.yaml against the Compose specification's JSON schema.

    check_compose_schema.py --schema compose_spec.json deploy/compose/compose.yaml

Unknown keys are errors: podman-compose ignores them, Docker Compose does not.
What the stack does is checked by running it (deploy/run-containers.sh
compose). The schema is the one docker-compose 1.29.2 ships; the top-level
`name`, which the specification gained later, is taken out first.
"""

import argparse
import json
import re
import sys

import jsonschema
import yaml


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--schema", required=True)
    ap.add_argument("compose")
    args = ap.parse_args()
    with open(args.compose) as f:
        doc = yaml.safe_load(f)
    with open(args.schema) as f:
        schema = json.load(f)
    doc.pop("name", None)
    # The file says draft 2019-09 with a trailing "#" that jsonschema does not
    # recognise; say so explicitly.
    errors = sorted(jsonschema.Draft201909Validator(schema).iter_errors(doc), key=lambda e: list(e.absolute_path))
    for e in errors:
        where = ".".join(str(p) for p in e.absolute_path) or "(top)"
        message = re.sub(r"^(.*) does not match any of the regexes: '\^x-'$", r"unknown key \1", e.message)
        print(f"ERROR {args.compose}: {where}: {message}", file=sys.stderr)
    if errors:
        return 1
    print(f"  {args.compose}: {len(doc.get('services', {}))} services, schema ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
