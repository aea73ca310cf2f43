#!/usr/bin/env python3
"""JSON schemas for kubeconform, for the kinds that some manifests use.

    k8s-schemas.py OUT_DIR --swagger swagger.json --crd CRD.yaml... -- MANIFEST.yaml...

Writes OUT_DIR/<kind><suffix>.json, named as kubeconform's schema-location
template `{{ .ResourceKind }}{{ .KindSuffix }}.json` looks them up
(deployment-apps-v1.json, service-v1.json, inferencepool-inference-v1.json).
Built-in kinds come from Kubernetes' OpenAPI v2 document (its definitions
copied into each schema, so each file stands alone), custom ones from CRDs'
openAPIV3Schema. As kubeconform's openapi2jsonschema does in strict mode,
objects with listed properties refuse unknown ones, and int-or-string and
quantity fields take numbers as well as strings. A kind that no input
defines is an error.
"""

import argparse
import copy
import json
import os
import sys

import yaml

INT_OR_STRING = {"oneOf": [{"type": "string"}, {"type": "integer"}]}
QUANTITY = {"oneOf": [{"type": "string"}, {"type": "number"}]}


def file_name(api_version, kind):
    group, _, version = api_version.rpartition("/")
    suffix = f"-{group.split('.')[0]}-{version}" if group else f"-{version}"
    return f"{kind.lower()}{suffix.lower()}.json"


def strict(node):
    """Refuse unknown properties; numbers where Kubernetes takes them."""
    if isinstance(node, list):
        return [strict(x) for x in node]
    if not isinstance(node, dict):
        return node
    if node.get("format") == "int-or-string" or node.get("x-kubernetes-int-or-string"):
        return dict(INT_OR_STRING, description=node.get("description", ""))
    out = {k: strict(v) for k, v in node.items()}
    if "properties" in out and "additionalProperties" not in out and not out.get(
        "x-kubernetes-preserve-unknown-fields"
    ):
        out["additionalProperties"] = False
    return out


def builtin_kinds(swagger):
    """(apiVersion, kind) -> standalone schema, from the OpenAPI v2 definitions."""
    defs = swagger["definitions"]
    for name, d in defs.items():
        if name.endswith(".Quantity"):
            defs[name] = dict(QUANTITY, description=d.get("description", ""))

    def reachable(name, seen):
        if name in seen:
            return
        seen.add(name)
        stack = [defs[name]]
        while stack:
            n = stack.pop()
            if isinstance(n, dict):
                ref = n.get("$ref")
                if isinstance(ref, str) and ref.startswith("#/definitions/"):
                    reachable(ref[len("#/definitions/"):], seen)
                stack.extend(n.values())
            elif isinstance(n, list):
                stack.extend(n)

    kinds = {}
    for name, d in defs.items():
        for gvk in d.get("x-kubernetes-group-version-kind", []):
            api_version = f"{gvk['group']}/{gvk['version']}" if gvk["group"] else gvk["version"]
            key = (api_version, gvk["kind"])
            if key in kinds:
                continue

            def build(name=name, d=d, api_version=api_version, kind=gvk["kind"]):
                seen = set()
                reachable(name, seen)
                schema = copy.deepcopy(d)
                schema["properties"]["apiVersion"] = {"type": "string", "enum": [api_version]}
                schema["properties"]["kind"] = {"type": "string", "enum": [kind]}
                schema["definitions"] = {n: defs[n] for n in sorted(seen) if n != name}
                return strict(schema)

            kinds[key] = build
    return kinds


def crd_kinds(paths):
    kinds = {}
    for path in paths:
        with open(path) as f:
            for crd in yaml.safe_load_all(f):
                if not crd or crd.get("kind") != "CustomResourceDefinition":
                    continue
                group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
                for v in crd["spec"]["versions"]:
                    api_version = f"{group}/{v['name']}"
                    schema = copy.deepcopy(v["schema"]["openAPIV3Schema"])
                    props = schema.setdefault("properties", {})
                    props["apiVersion"] = {"type": "string", "enum": [api_version]}
                    props["kind"] = {"type": "string", "enum": [kind]}
                    # Served-only versions still validate; ones no longer served do not.
                    if v.get("served", True):
                        kinds[(api_version, kind)] = lambda s=schema: strict(s)
    return kinds


def manifest_kinds(paths):
    used = set()
    for path in paths:
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if doc:
                    used.add((doc["apiVersion"], doc["kind"]))
    return used


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--swagger", required=True)
    ap.add_argument("--crd", nargs="+", default=[])
    ap.add_argument("manifests", nargs="+")
    args = ap.parse_args()

    with open(args.swagger) as f:
        available = builtin_kinds(json.load(f))
    available.update(crd_kinds(args.crd))
    os.makedirs(args.out, exist_ok=True)
    missing = []
    for api_version, kind in sorted(manifest_kinds(args.manifests)):
        build = available.get((api_version, kind))
        if build is None:
            missing.append(f"{kind} ({api_version})")
            continue
        with open(os.path.join(args.out, file_name(api_version, kind)), "w") as f:
            json.dump(build(), f)
    if missing:
        sys.exit(f"k8s-schemas: no schema for {', '.join(missing)}")


if __name__ == "__main__":
    main()
