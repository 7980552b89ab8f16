"""The canary's weighted routing on Kubernetes: a Gateway API `HTTPRoute` (gateway.networking.k8s.io/v1)
that splits the endpoint's requests between the current release's Service and the candidate's by weight.

The Gateway API is a CRD, so the Kubernetes schemas `kubernetes-validate` bundles do not hold it;
`validate_route` checks a route offline against the HTTPRoute v1 fields this project renders, with
the API's own limits (names of 1-253 characters, ports 1-65535, weights 0-1,000,000, at most 16
backends per rule, RFC 1123 hostnames) and no unknown field, as strict validation does for the rest.
"""

from __future__ import annotations

from typing import Any

import jsonschema

API_VERSION = "gateway.networking.k8s.io/v1"
MAX_WEIGHT = 1_000_000
_NAME = {"type": "string", "minLength": 1, "maxLength": 253}
_LABEL = {"type": "string", "minLength": 1, "maxLength": 63, "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}
_HOSTNAME = {"type": "string", "minLength": 1, "maxLength": 253,
             "pattern": r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"}
_PORT = {"type": "integer", "minimum": 1, "maximum": 65535}


def _object(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required or [], "additionalProperties": False}


HTTPROUTE_SCHEMA = _object({
    "apiVersion": {"const": API_VERSION},
    "kind": {"const": "HTTPRoute"},
    "metadata": _object({"name": _LABEL, "namespace": _LABEL, "labels": {"type": "object"},
                         "annotations": {"type": "object"}}, ["name"]),
    "spec": _object({
        "parentRefs": {"type": "array", "maxItems": 32, "items": _object({
            "group": {"type": "string"}, "kind": {"type": "string"}, "namespace": _LABEL, "name": _NAME,
            "sectionName": _LABEL, "port": _PORT}, ["name"])},
        "hostnames": {"type": "array", "maxItems": 16, "items": _HOSTNAME},
        "rules": {"type": "array", "minItems": 1, "maxItems": 16, "items": _object({
            "name": _LABEL,
            "matches": {"type": "array", "maxItems": 64, "items": _object({
                "path": _object({"type": {"enum": ["Exact", "PathPrefix", "RegularExpression"]},
                                 "value": {"type": "string", "maxLength": 1024}}),
            })},
            "backendRefs": {"type": "array", "maxItems": 16, "items": _object({
                "group": {"type": "string"}, "kind": {"type": "string"}, "name": _NAME, "namespace": _LABEL,
                "port": _PORT, "weight": {"type": "integer", "minimum": 0, "maximum": MAX_WEIGHT}}, ["name"])},
        })},
    }),
}, ["apiVersion", "kind", "metadata", "spec"])


def render_route(name: str, namespace: str, host: str, gateway: str, backends: list[tuple[str, int]]) -> dict[str, Any]:
    """The route of `host`'s /v1 requests through the Gateway `gateway`, split over `backends`
    (Service name, weight): each Service gets weight / (sum of weights) of the requests."""
    return {
        "apiVersion": API_VERSION, "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/name": "llm-server"}},
        "spec": {
            "parentRefs": [{"name": gateway}],
            "hostnames": [host],
            "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/v1"}}],
                       "backendRefs": [{"name": service, "port": 80, "weight": weight}
                                       for service, weight in backends]}],
        },
    }


def validate_route(route: dict[str, Any]) -> None:
    """Raise jsonschema.ValidationError (naming the field) unless `route` is a valid HTTPRoute."""
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(HTTPROUTE_SCHEMA).iter_errors(route))
    if error is not None:
        where = ".".join(str(part) for part in error.absolute_path) or "the route"
        raise jsonschema.ValidationError(f"HTTPRoute {where}: {error.message}")
    weights = [ref.get("weight", 1) for rule in route["spec"]["rules"] for ref in rule.get("backendRefs", [])]
    if weights and not any(weights):
        raise jsonschema.ValidationError("spec.rules.backendRefs: every weight is 0, so no request is routed")
