"""Generate docs/api.md (and docs/openapi/*.json) from the services' OpenAPI schemas: `make docs`
(= `python -m docs.gen_api` from the repository root).

The FastAPI apps are built exactly as the services build them (their request limits come from
config/, so the documented limits are the configured ones); nothing connects to Redis, since only
the schema is read.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from services.ingest.app import create_app as ingest_app
from services.monitor.app import create_app as monitor_app
from services.ranker.app import create_app as ranker_app
from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent

DOCS = ROOT / "docs"
PLACEHOLDER_ENV = {
    "queue_url": "redis://queue-redis:6379/0",
    "feature_store_url": "redis://store-redis:6379/0",
    "lake_path": "/data/lake",
    "profile": "default",
}
METHODS = ("get", "post", "put", "patch", "delete")


def schemas() -> dict[str, dict[str, Any]]:
    settings = Settings(**PLACEHOLDER_ENV)  # type: ignore[arg-type]
    return {
        "ranker": ranker_app(settings).openapi(),
        "ingest": ingest_app(settings).openapi(),
        "monitor": monitor_app(settings).openapi(),
    }


def resolve(spec: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if ref is None:
        return node
    target: Any = spec
    for part in ref.removeprefix("#/").split("/"):
        target = target[part]
    resolved: dict[str, Any] = target
    return resolved


def type_of(spec: dict[str, Any], node: dict[str, Any]) -> str:
    if "$ref" in node:
        return f"`{node['$ref'].rsplit('/', 1)[-1]}`"
    if "anyOf" in node:
        return " \\| ".join(type_of(spec, n) for n in node["anyOf"])
    kind = node.get("type", "any")
    if kind == "array":
        return f"array of {type_of(spec, node.get('items', {}))}"
    if kind == "object" and "additionalProperties" in node:
        extra = node["additionalProperties"]
        inner = type_of(spec, extra) if isinstance(extra, dict) else "any"
        return f"object of {inner}"
    return str(kind)


def number(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def constraints(node: dict[str, Any]) -> str:
    names = {
        "minimum": "≥",
        "maximum": "≤",
        "exclusiveMinimum": ">",
        "exclusiveMaximum": "<",
        "minLength": "min length",
        "maxLength": "max length",
        "minItems": "min items",
        "maxItems": "max items",
        "pattern": "pattern",
    }
    found = [f"{label} {number(node[key])}" for key, label in names.items() if key in node]
    for option in node.get("anyOf", []):
        found += [f"{label} {number(option[key])}" for key, label in names.items() if key in option]
        if "items" in option:
            found += [f"items {constraints(option['items'])}".strip()] if constraints(option["items"]) else []
    if "items" in node and constraints(node["items"]):
        found.append(f"items {constraints(node['items'])}")
    if "default" in node and node["default"] is not None:
        found.append(f"default `{json.dumps(node['default'])}`")
    return ", ".join(found)


def schema_table(spec: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    schema = resolve(spec, schema)
    properties = schema.get("properties")
    if not properties:
        return [f"Body: {type_of(spec, schema)}", ""]
    required = set(schema.get("required", []))
    lines = ["| field | type | required | description |", "|---|---|---|---|"]
    for name, prop in properties.items():
        text = " ".join(
            part
            for part in (prop.get("description", ""), f"({constraints(prop)})" if constraints(prop) else "")
            if part
        )
        lines.append(f"| `{name}` | {type_of(spec, prop)} | {'yes' if name in required else ''} | {text} |")
    return [*lines, ""]


def render_operation(spec: dict[str, Any], method: str, path: str, op: dict[str, Any]) -> list[str]:
    lines = [f"### `{method.upper()} {path}`", ""]
    description = op.get("description") or op.get("summary") or ""
    if description:
        lines += [description.strip(), ""]
    params = op.get("parameters", [])
    if params:
        lines += ["| parameter | in | type | required | description |", "|---|---|---|---|---|"]
        for p in params:
            lines.append(
                f"| `{p['name']}` | {p['in']} | {type_of(spec, p.get('schema', {}))} | "
                f"{'yes' if p.get('required') else ''} | {p.get('description', '')} |"
            )
        lines.append("")
    body = op.get("requestBody", {}).get("content", {}).get("application/json")
    if body:
        lines += ["Request body (JSON):", "", *schema_table(spec, body["schema"])]
    lines += ["| status | meaning | body |", "|---|---|---|"]
    for code, response in op.get("responses", {}).items():
        content = response.get("content", {}).get("application/json", {}).get("schema")
        shown = type_of(spec, content) if content else ""
        lines.append(f"| {code} | {response.get('description', '')} | {shown} |")
    return [*lines, ""]


def render_service(name: str, spec: dict[str, Any]) -> list[str]:
    info = spec["info"]
    lines = [f"## {info['title']}", ""]
    if info.get("summary"):
        lines += [info["summary"], ""]
    lines += [f"Machine-readable schema: [`openapi/{name}.json`](openapi/{name}.json).", ""]
    for path, item in spec["paths"].items():
        for method in METHODS:
            if method in item:
                lines += render_operation(spec, method, path, item[method])
    used = spec.get("components", {}).get("schemas", {})
    if used:
        lines += [f"### {info['title']}: schemas", ""]
        for schema_name, schema in sorted(used.items()):
            if schema_name in {"HTTPValidationError", "ValidationError"}:
                continue
            lines += [f"#### `{schema_name}`", ""]
            if schema.get("description"):
                lines += [schema["description"].strip(), ""]
            lines += schema_table(spec, schema)
    return lines


def main() -> int:
    specs = schemas()
    (DOCS / "openapi").mkdir(parents=True, exist_ok=True)
    for name, spec in specs.items():
        (DOCS / "openapi" / f"{name}.json").write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
    lines = [
        "# feedrank HTTP API",
        "",
        "Generated from the services' OpenAPI schemas by `make docs` (`docs/gen_api.py`); do not edit",
        "by hand. Request limits shown are those of the default profile. A running service also serves",
        "its interactive docs at `/docs` and its schema at `/openapi.json` (in Compose: ranker through",
        "the gateway on `RANKER_PORT`, ingest on `INGEST_PORT`, monitor on `MONITOR_PORT`).",
        "",
        'Errors carry `{"detail": ...}`: a string, or for 422 a list naming each invalid field.',
        "`/metrics` (Prometheus text format) is served by every service and left out of the schemas.",
        "",
    ]
    for name in ("ranker", "ingest", "monitor"):
        lines += render_service(name, specs[name])
    (DOCS / "api.md").write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {DOCS / 'api.md'} and docs/openapi/{{{','.join(specs)}}}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
