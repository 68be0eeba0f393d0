#!/usr/bin/env python3
"""Validates a stream of Kubernetes manifests on stdin against the JSON schemas that
kubernetes-validate bundles, in strict mode (unknown fields are errors), for each
--version given ("latest": the newest one bundled).

Its own command line only warns about a kind it has no schema for, which would let a
misspelt or removed built-in apiVersion (policy/v1beta1, say) pass. Here that is an
error, unless the kind is named with --no-schema apiVersion/Kind: custom resources
have no bundled schema.
"""
import argparse
import sys

import kubernetes_validate
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, ValidationError, latest_version


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--version", action="append", required=True)
    parser.add_argument("--no-schema", action="append", default=[])
    args = parser.parse_args()

    versions = [latest_version() if v == "latest" else v for v in args.version]
    documents = [doc for doc in yaml.safe_load_all(sys.stdin) if doc]
    if not documents:
        print("no manifests on stdin")
        return 1
    failures = 0
    for doc in documents:
        kind = f"{doc.get('apiVersion')}/{doc.get('kind')}"
        name = f"{kind} {doc.get('metadata', {}).get('name')}"
        if kind in args.no_schema:
            print(f"skipped {name}: no bundled schema, as expected")
            continue
        for version in versions:
            try:
                used = kubernetes_validate.validate(doc, version, strict=True)
                print(f"ok {name} against {used}")
            except ValidationError as err:
                path = ".".join(str(part) for part in err.path)
                print(f"INVALID {name} against {err.version}: {path}: {err.message}")
                failures += 1
            except SchemaNotFoundError as err:
                print(f"INVALID {name}: {err.message}")
                failures += 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
