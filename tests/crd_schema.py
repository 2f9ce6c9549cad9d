"""Validation of custom resources against the upstream CRD schemas vendored under tests/crds/.

The API server's rules for a CRD's structural schema (Kubernetes docs, "Extend the Kubernetes API with
CustomResourceDefinitions": structural schemas, pruning, defaulting, validation rules; the code in
k8s.io/apiextensions-apiserver/pkg/apiserver/schema) are mapped onto JSON Schema and checked with `jsonschema`:

* an object's fields are the `properties` of its schema; anything else is an unknown field, which
  `kubectl apply` (server-side field validation `Strict`, the default since 1.27) reports as an error, unless
  the node carries `x-kubernetes-preserve-unknown-fields: true`. `additionalProperties` gives a map.
* `x-kubernetes-embedded-resource: true` allows `apiVersion`, `kind` and `metadata` on that node;
  `x-kubernetes-int-or-string: true` takes an integer or a string; `nullable: true` allows null (a null for a
  non-nullable field is reported here, where the API server would prune it: we never mean to write one).
* the root `metadata` is an ObjectMeta (only its common fields are accepted: name, namespace, labels,
  annotations, generateName, finalizers, ownerReferences).
* `default`s are applied before validation (the API server defaults on create, then validates), so the
  CEL rules see what the controller will see.
* OpenAPI v3.0 keywords (`exclusiveMinimum: true`, `nullable`) are turned into their JSON Schema 2020-12
  forms; `format` is checked for the formats Kubernetes knows (int32, int64, byte, date-time, duration, ...).
* `x-kubernetes-list-type: set` items are unique; `map` items are unique by `x-kubernetes-list-map-keys`.
* `x-kubernetes-validations` (CEL) rules are evaluated with cel-python against `self` (the node); transition
  rules (those that use `oldSelf`) only run on update and are skipped; a rule using a Kubernetes CEL library
  function cel-python lacks is reported as `unevaluated` (tests assert that list is what they expect).
"""

from __future__ import annotations

import base64
import copy
import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema

CRDS = Path(__file__).resolve().parent / "crds"

OBJECT_META = {
    "type": "object",
    "properties": {
        "name": {"type": "string"}, "namespace": {"type": "string"}, "generateName": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {"type": "array", "items": {"type": "object"}},
    },
    "additionalProperties": False,
}


@dataclass
class CRD:
    group: str
    kind: str
    version: str
    scope: str
    served: list[str]
    schema: dict  # the vendored openAPIV3Schema (structural, OpenAPI v3.0)
    source: dict[str, str]  # repo, tag, commit, path
    file: Path
    api_schema: dict | None = None  # the typed Go API schema where the CRD is free-form (Katib's Experiment)
    _validator: object = field(default=None, repr=False)
    _api_validator: object = field(default=None, repr=False)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"

    def validator(self):
        if self._validator is None:
            self._validator = Validator(to_json_schema(self.schema, root=True), format_checker=FORMATS)
        return self._validator

    def api_validator(self):
        if self._api_validator is None and self.api_schema is not None:
            self._api_validator = Validator(to_json_schema(self.api_schema, root=True), format_checker=FORMATS)
        return self._api_validator


def load(path: Path) -> CRD:
    text = path.read_text()
    header = {}
    body = []
    for line in text.splitlines():
        m = re.fullmatch(r"# (repo|tag|commit|path|api-schema): (.+)", line)
        if m:
            header[m.group(1)] = m.group(2)
        elif not line.startswith("#"):
            body.append(line)
    data = json.loads("\n".join(body))
    return CRD(data["group"], data["kind"], data["version"], data["scope"], data["served"],
               expand(data["openAPIV3Schema"]), header, path,
               expand(data["apiSchema"]) if "apiSchema" in data else None)


def expand(schema: dict) -> dict:
    """The upstream schema back from the vendored file: subschemas stored once under `x-shared-schemas` (to
    keep the files small, tests/crds/vendor.py) are put back where {"x-shared": name} stands."""
    shared = schema.get("x-shared-schemas", {})

    def walk(node):
        if isinstance(node, dict):
            if set(node) == {"x-shared"}:
                return walk(shared[node["x-shared"]])
            return {k: walk(v) for k, v in node.items() if k != "x-shared-schemas"}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)


@functools.cache
def crds() -> dict[tuple[str, str], CRD]:
    """(group, kind) -> vendored CRD."""
    out = {}
    for p in sorted(CRDS.glob("*/*.yaml")):
        crd = load(p)
        out[(crd.group, crd.kind)] = crd
    return out


def crd_for(doc: dict) -> CRD | None:
    group = doc.get("apiVersion", "").rpartition("/")[0]
    return crds().get((group, doc.get("kind")))


# --- structural schema -> JSON Schema ----------------------------------------------------------------------------

_DROP = {"x-kubernetes-preserve-unknown-fields", "x-kubernetes-embedded-resource", "x-kubernetes-int-or-string",
         "nullable", "default", "x-kubernetes-list-type", "x-kubernetes-list-map-keys", "x-kubernetes-map-type",
         "x-kubernetes-validations"}


def to_json_schema(s: dict, root: bool = False, structural: bool = True) -> dict:
    """One structural-schema node as JSON Schema 2020-12. `structural`: the node defines structure (not a
    branch of allOf/anyOf/oneOf/not, which only add value validations and so prune nothing)."""
    out = {k: v for k, v in s.items() if k not in _DROP and k not in ("properties", "items", "additionalProperties",
                                                                     "allOf", "anyOf", "oneOf", "not")}
    if s.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if s.get("exclusiveMinimum") is True:
        out["exclusiveMinimum"] = out.pop("minimum")
    elif s.get("exclusiveMinimum") is False:
        out.pop("exclusiveMinimum")
    if s.get("exclusiveMaximum") is True:
        out["exclusiveMaximum"] = out.pop("maximum")
    elif s.get("exclusiveMaximum") is False:
        out.pop("exclusiveMaximum")
    if s.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    props = {k: to_json_schema(v, structural=structural) for k, v in s.get("properties", {}).items()}
    if s.get("x-kubernetes-embedded-resource") or root:
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        if root:
            props["metadata"] = OBJECT_META
        elif not s.get("properties", {}).get("metadata", {}).get("properties"):
            props["metadata"] = {"type": "object"}  # an ObjectMeta the controller fills in
    if props:
        out["properties"] = props
    if "items" in s:
        out["items"] = to_json_schema(s["items"], structural=structural)
    if isinstance(s.get("additionalProperties"), dict):
        out["additionalProperties"] = to_json_schema(s["additionalProperties"], structural=structural)
    elif "additionalProperties" in s:
        out["additionalProperties"] = s["additionalProperties"]
    elif structural and s.get("type") == "object" and not s.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False  # pruned by the API server, rejected by kubectl's strict validation
    for key in ("allOf", "anyOf", "oneOf"):
        if key in s:
            out.setdefault("allOf", []).append({key: [to_json_schema(b, structural=False) for b in s[key]]})
    if "not" in s:
        out["not"] = to_json_schema(s["not"], structural=False)
    if s.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    if s.get("x-kubernetes-list-type") == "map" and s.get("x-kubernetes-list-map-keys"):
        out["x-list-map-keys"] = s["x-kubernetes-list-map-keys"]
    if s.get("x-kubernetes-validations"):
        out["x-cel"] = s["x-kubernetes-validations"]
    return out


# --- formats -------------------------------------------------------------------------------------------------------

FORMATS = jsonschema.FormatChecker()


@FORMATS.checks("int32")
def _int32(v):
    return not isinstance(v, int) or -(2**31) <= v < 2**31


@FORMATS.checks("int64")
def _int64(v):
    return not isinstance(v, int) or -(2**63) <= v < 2**63


@FORMATS.checks("byte")
def _byte(v):
    if not isinstance(v, str):
        return True
    try:
        base64.b64decode(v, validate=True)
    except ValueError:
        return False
    return True


@FORMATS.checks("duration")
def _duration(v):  # Go time.ParseDuration
    return not isinstance(v, str) or re.fullmatch(r"(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+|0", v) is not None


@FORMATS.checks("date-time")
def _date_time(v):
    return not isinstance(v, str) or re.fullmatch(
        r"\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)", v) is not None


# --- the extra keywords ----------------------------------------------------------------------------------------------

def _list_map_keys(validator, keys, instance, schema):
    if not isinstance(instance, list):
        return
    seen = set()
    for item in instance:
        if isinstance(item, dict):
            key = tuple(json.dumps(item.get(k), sort_keys=True) for k in keys)
            if key in seen:
                yield jsonschema.ValidationError(f"duplicate entry for list-map keys {keys}: {key}")
            seen.add(key)


UNEVALUATED: list[tuple[str, str]] = []  # (rule, why) of CEL rules cel-python could not evaluate
EVALUATED: list[str] = []  # the CEL rules evaluated (tests check that some applied)


def _cel(validator, rules, instance, schema):
    for rule in rules:
        if re.search(r"\boldSelf\b", rule["rule"]):
            continue  # a transition rule: only evaluated on update
        ok, why = cel_eval(rule["rule"], instance)
        EVALUATED.append(rule["rule"])
        if ok is None:
            UNEVALUATED.append((rule["rule"], why))
        elif not ok:
            yield jsonschema.ValidationError(
                f"x-kubernetes-validations: {rule.get('message') or rule['rule']} (rule: {rule['rule']})")


Validator = jsonschema.validators.extend(jsonschema.Draft202012Validator,
                                          {"x-list-map-keys": _list_map_keys, "x-cel": _cel})


# --- CEL -----------------------------------------------------------------------------------------------------------

def _k8s_functions():
    """The Kubernetes CEL string library functions the vendored rules use that cel-python lacks
    (k8s.io/apiserver/pkg/cel/library, cel-go ext.Strings)."""
    from celpy import celtypes

    def lower_ascii(s):
        return celtypes.StringType(str(s).lower())

    def upper_ascii(s):
        return celtypes.StringType(str(s).upper())

    def trim(s):
        return celtypes.StringType(str(s).strip())

    def split(s, sep):
        return celtypes.ListType([celtypes.StringType(p) for p in str(s).split(str(sep))])

    return {"lowerAscii": lower_ascii, "upperAscii": upper_ascii, "trim": trim, "split": split}


@functools.cache
def _cel_program(rule: str):
    import celpy

    env = celpy.Environment()
    return env.program(env.compile(rule), functions=_k8s_functions())


def cel_eval(rule: str, value) -> tuple[bool | None, str]:
    """(True/False, "") when the rule evaluated, (None, why) when cel-python cannot evaluate it."""
    import celpy

    try:
        prog = _cel_program(rule)
    except Exception as exc:  # noqa: BLE001 - a parse error of cel-python
        return None, f"compile: {exc}"
    try:
        result = prog.evaluate({"self": celpy.json_to_cel(value)})
    except celpy.CELEvalError as exc:
        msg = str(exc.args[0]) if exc.args else str(exc)
        if "undeclared reference" in msg:
            return None, msg[:120]
        return False, msg[:200]
    if isinstance(result, celpy.CELEvalError):
        msg = str(result.args[0]) if result.args else str(result)
        return (None, msg[:120]) if "undeclared reference" in msg else (False, msg[:200])
    return bool(result), ""


# --- defaulting ----------------------------------------------------------------------------------------------------

def apply_defaults(value, s: dict):
    """The API server's defaulting: a missing field with a `default` gets it (recursively, in order)."""
    if isinstance(value, dict):
        for name, sub in s.get("properties", {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                apply_defaults(value[name], sub)
        if isinstance(s.get("additionalProperties"), dict):
            for k in value:
                if k not in s.get("properties", {}):
                    apply_defaults(value[k], s["additionalProperties"])
    elif isinstance(value, list) and isinstance(s.get("items"), dict):
        for item in value:
            apply_defaults(item, s["items"])
    return value


# --- the check -----------------------------------------------------------------------------------------------------

def errors(doc: dict, embedded: bool = False) -> list[str]:
    """Everything the API server (and kubectl's strict field validation) would reject in `doc`.

    embedded: `doc` is a template another controller creates objects from (a Katib trialSpec), so a missing
    metadata.name is not an error."""
    crd = crd_for(doc)
    if crd is None:
        return [f"{doc.get('apiVersion')} {doc.get('kind')}: no vendored CRD"]
    version = doc["apiVersion"].rpartition("/")[2]
    if version not in crd.served:
        return [f"apiVersion {doc['apiVersion']}: not served by the {crd.kind} CRD ({crd.source.get('repo')} "
                f"{crd.source.get('tag')} serves {', '.join(crd.group + '/' + v for v in crd.served)})"]
    if version != crd.version:
        return [f"apiVersion {doc['apiVersion']}: served, but the vendored schema is {crd.api_version}"]
    out = []
    if not embedded and not doc.get("metadata", {}).get("name"):
        out.append("metadata.name: required")
    if crd.scope == "Cluster" and doc.get("metadata", {}).get("namespace"):
        out.append("metadata.namespace: the kind is cluster-scoped")
    defaulted = apply_defaults(copy.deepcopy(doc), crd.schema)
    for e in crd.validator().iter_errors(defaulted):
        where = "/".join(map(str, e.absolute_path)) or "(root)"
        out.append(f"{where}: {e.message}")
    if crd.api_validator() is not None:
        # the API server keeps anything here; the controller decodes into its Go types, silently dropping
        # what they lack, so an unknown field is a setting that never takes effect
        for e in crd.api_validator().iter_errors(defaulted):
            where = "/".join(map(str, e.absolute_path)) or "(root)"
            out.append(f"{where}: {e.message} ({crd.source.get('api-schema', 'API schema')})")
    return out
