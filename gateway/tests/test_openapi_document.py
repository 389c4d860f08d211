"""The OpenAPI document (gateway/openapi.json) against the spec, the app's routes and the README's
error table; /openapi.json and /docs serve it with nothing from another origin. No stack needed:
tests/test_openapi.py holds the live gateway to the document."""
import json
import re
from pathlib import Path

import pytest
from openapi_spec_validator import validate
from werkzeug.routing import Rule

from gateway.app import DOCS_PAGE, OPENAPI_DOCUMENT, create_app

REPO = Path(__file__).resolve().parents[2]
SWAGGER = OPENAPI_DOCUMENT.parent / "static" / "swagger"


@pytest.fixture(scope="module")
def document() -> dict:
    return json.loads(OPENAPI_DOCUMENT.read_text())


@pytest.fixture(scope="module")
def client():
    return create_app().test_client()  # Redis is only dialled by routes that need it


def openapi_path(rule: Rule) -> str:
    """Flask's `/static/<path:filename>` as OpenAPI's `/static/{filename}`."""
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)


def test_document_is_valid_openapi_3_1(document):
    assert document["openapi"].startswith("3.1.")
    validate(document)


def test_every_route_is_documented_with_its_methods(document):
    routes = {}
    for rule in create_app().url_map.iter_rules():
        routes.setdefault(openapi_path(rule), set()).update(m.lower() for m in rule.methods - {"HEAD", "OPTIONS"})
    # Flask's static route names its parameter `filename`; the document calls it `path`.
    routes["/static/{path}"] = routes.pop("/static/{filename}")
    documented = {path: {m for m in item if m in {"get", "post", "put", "patch", "delete"}}
                  for path, item in document["paths"].items()}
    assert routes == documented


def codes_in(schema, document) -> set[str]:
    """Every error code an `enum` in the (sub)schema allows, following $refs."""
    if isinstance(schema, dict):
        if "$ref" in schema:
            target = document
            for part in schema["$ref"].lstrip("#/").split("/"):
                target = target[part]
            return codes_in(target, document)
        found = set(schema.get("properties", {}).get("code", {}).get("enum", []))
        return found.union(*(codes_in(value, document) for value in schema.values()))
    if isinstance(schema, list):
        return set().union(*(codes_in(item, document) for item in schema))
    return set()


def readme_error_table() -> dict[str, set[int]]:
    """code -> statuses, from the README's API error table."""
    api = (REPO / "README.md").read_text().split("### API", 1)[1]
    table = {}
    for statuses, codes in re.findall(r"^\| ([\d, ]+) \| (.+?) \|", api, flags=re.M):
        names = re.findall(r"`([a-z_]+)`", codes)
        for status, code in zip(*(statuses.split(", "), names)) if "," in statuses else ((statuses, c) for c in names):
            table.setdefault(code, set()).add(int(status))
    return table


def test_every_error_of_the_readme_is_documented_with_its_status(document):
    table = readme_error_table()
    assert {"missing_image", "payload_too_large", "timeout", "not_found", "method_not_allowed"} <= table.keys()
    documented = {}
    responses = [r for item in document["paths"].values() for op in item.values() for r in op["responses"].items()]
    responses += list(document["components"]["responses"].items())
    for name, response in responses:
        status = int(name) if name.isdigit() else {"NotFound": 404, "MethodNotAllowed": 405}[name]
        for code in codes_in(response, document):
            documented.setdefault(code, set()).add(status)
    for code, statuses in table.items():
        assert statuses <= documented.get(code, set()), code
    for status in (502, 503, 504, 413, 422):  # every 5xx and every error status of /predict names its codes
        assert codes_in(document["paths"]["/predict"]["post"]["responses"][str(status)], document)


def test_every_503_documents_retry_after(document):
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if "503" in operation["responses"] and path != "/readyz":  # a probe's 503 is not a retry hint
                assert "Retry-After" in operation["responses"]["503"]["headers"], (method, path)


def test_openapi_json_serves_the_document(client, document):
    response = client.get("/openapi.json")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert response.get_json() == document


def test_docs_page_and_its_assets_come_from_the_gateway(client):
    page = client.get("/docs")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert html == DOCS_PAGE.read_text()
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert len(assets) == 3
    for asset in assets:
        assert not re.match(r"^(?:[a-z]+:)?//", asset), f"{asset} would load from another origin"
        served = client.get(f"/{asset}")  # relative to /docs, hence to the root
        assert served.status_code == 200, asset
        assert served.get_data() == (SWAGGER.parent.parent / asset).read_bytes()
        served.close()
    initializer = (SWAGGER / "swagger-initializer.js").read_text()
    assert 'url: "openapi.json"' in initializer and "validatorUrl: null" in initializer
    assert "//" not in re.sub(r"//.*", "", initializer)  # no URL outside comments


def test_swagger_ui_is_vendored_with_its_license():
    assert sorted(p.name for p in SWAGGER.iterdir()) == sorted([
        "LICENSE", "NOTICE", "index.html", "swagger-initializer.js", "swagger-ui-bundle.js",
        "swagger-ui-bundle.js.LICENSE.txt", "swagger-ui.css"])
    assert "Apache License" in (SWAGGER / "LICENSE").read_text()
    assert "swagger-ui-dist 5.35.0" in (SWAGGER / "index.html").read_text()


def test_unknown_routes_and_methods_get_the_documented_errors(client):
    for response, status, code in ((client.get("/nope"), 404, "not_found"),
                                   (client.delete("/openapi.json"), 405, "method_not_allowed"),
                                   (client.get("/static/swagger/nope.js"), 404, "not_found")):
        assert response.status_code == status
        assert response.get_json()["error"]["code"] == code
