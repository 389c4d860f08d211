"""k8s/components/monitoring: the ServiceMonitor, PodMonitor, PrometheusRule and Grafana dashboard.

kubernetes-validate has no schema for the Prometheus Operator's kinds, so they are checked here:
the fields used exist in the CRDs, the monitors select the gateway's Service and the worker's pods
on declared ports, every alert has a severity, summary and description, and every PromQL
expression (alerts and dashboard) names only metrics and labels that gateway/metrics.py and
worker/metrics.py declare, scoped to the scrape jobs the monitors set.
"""
import ast
import json
import re

import pytest

from k8s.tests import policy
from k8s.tests.manifests import K8S, K8S_CONFIG, OVERLAYS, ROOT, read_env_file, rendered

COMPONENT = K8S / "components" / "monitoring"
DASHBOARD = COMPONENT / "dashboard.json"
WITH_MONITORING = ["k8s/overlays/monitoring"]
MONITORING_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
# Scrape job per service: the relabelings of the monitors set them; every selector of a service's
# metric must name its job (another application may export a metric of the same name).
JOBS = {"gateway": "cifar10-gateway", "worker": "cifar10-worker"}
# Labels Prometheus (and the Prometheus Operator) put on every scraped series.
TARGET_LABELS = {"job", "namespace", "pod", "instance", "container", "endpoint", "service"}
# Series Prometheus makes itself for each target.
BUILTIN_METRICS = {"up": set()}
AGGREGATIONS = {"sum", "min", "max", "avg", "count", "group", "stddev", "stdvar", "topk", "bottomk", "quantile"}
FUNCTIONS = {"rate", "irate", "increase", "delta", "histogram_quantile", "absent", "vector", "scalar",
             "clamp_min", "clamp_max", "max_over_time", "min_over_time", "avg_over_time", "time"}
LABEL_LIST_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
BINARY_KEYWORDS = {"and", "or", "unless", "bool", "offset"}
DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")
TOKEN = re.compile(r"""\s+|(?P<str>"(?:[^"\\]|\\.)*")|(?P<range>\[[^\]]*\])|(?P<matchers>\{[^}]*\})
                   |(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)|(?P<num>\d+(?:\.\d+)?(?:e[+-]?\d+)?)
                   |(?P<op>==|!=|>=|<=|[-+*/%^()<>,])""", re.X)
MATCHER = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')


# ---- what the services export ----------------------------------------------------------------

def declared_metrics() -> dict[str, set[str]]:
    """Every series name gateway/metrics.py and worker/metrics.py export, with its labels: read
    from the source (Counter, Gauge, Histogram and the scrape-time GaugeMetricFamily)."""
    found = {}
    for path in (ROOT / "gateway" / "metrics.py", ROOT / "worker" / "metrics.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args
                    and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                continue
            kind, metric = node.func.id, node.args[0].value
            labels_arg = node.args[2] if len(node.args) > 2 else next(
                (k.value for k in node.keywords if k.arg in ("labelnames", "labels")), None)
            labels = set(ast.literal_eval(labels_arg)) if labels_arg is not None else set()
            if kind == "Counter":
                found[metric if metric.endswith("_total") else metric + "_total"] = labels
            elif kind == "Histogram":
                found.update({metric + "_bucket": labels | {"le"}, metric + "_sum": labels, metric + "_count": labels})
            elif kind in ("Gauge", "GaugeMetricFamily"):
                found[metric] = labels
    return found


def service_of(metric: str) -> str | None:
    return next((service for service in JOBS if metric.startswith(service + "_")), None)


# ---- PromQL, as far as these expressions need ------------------------------------------------

def parse_matchers(text: str) -> dict[str, tuple[str, str]]:
    body, matchers, position = text[1:-1].strip(), {}, 0
    while position < len(body):
        match = MATCHER.match(body, position)
        if not match:
            raise ValueError(f"bad label matcher in {text!r}")
        matchers[match.group(1)] = (match.group(2), match.group(3))
        position = match.end()
    return matchers


def selectors(expr: str) -> tuple[list[tuple[str, dict]], set[str]]:
    """The metric selectors of a PromQL expression, (name, {label: (operator, value)}), and the
    label names of its by/without/on clauses. ValueError on what it cannot read: unknown
    functions, unbalanced parentheses, stray tokens."""
    tokens, position = [], 0
    while position < len(expr):
        match = TOKEN.match(expr, position)
        if not match:
            raise ValueError(f"unreadable at {expr[position:position + 20]!r}")
        position = match.end()
        if match.lastgroup:
            tokens.append((match.lastgroup, match.group(match.lastgroup)))
    found, grouping, depth, i = [], set(), 0, 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1] if i + 1 < len(tokens) else (None, None)
        if kind == "op" and text in "()":
            depth += 1 if text == "(" else -1
            if depth < 0:
                raise ValueError(f"unbalanced parentheses in {expr!r}")
        elif kind == "ident" and text in LABEL_LIST_KEYWORDS:
            if following != ("op", "("):
                raise ValueError(f"{text} without a label list in {expr!r}")
            end = next(j for j in range(i + 2, len(tokens)) if tokens[j] == ("op", ")"))
            grouping |= {t for k, t in tokens[i + 2:end] if k == "ident"}
            i = end
        elif kind == "ident" and (text in AGGREGATIONS or following == ("op", "(")):
            if text not in AGGREGATIONS | FUNCTIONS:
                raise ValueError(f"unknown function {text} in {expr!r}")
        elif kind == "ident" and text not in BINARY_KEYWORDS:
            matchers = parse_matchers(following[1]) if following[0] == "matchers" else {}
            found.append((text, matchers))
            i += 1 if matchers or following[0] == "matchers" else 0
        elif kind == "matchers":
            raise ValueError(f"a selector without a metric name in {expr!r}")
        i += 1
    if depth:
        raise ValueError(f"unbalanced parentheses in {expr!r}")
    return found, grouping


def expression_errors(expr: str, metrics: dict[str, set[str]]) -> list[str]:
    try:
        found, grouping = selectors(expr)
    except ValueError as exc:
        return [str(exc)]
    errors, known = [], {**metrics, **BUILTIN_METRICS}
    if not found:
        errors.append(f"no metric in {expr!r}")
    labels_in_expr = set(TARGET_LABELS)
    for metric, matchers in found:
        if metric not in known:
            errors.append(f"unknown metric {metric} in {expr!r}")
            continue
        labels_in_expr |= known[metric]
        unknown = set(matchers) - known[metric] - TARGET_LABELS
        if unknown:
            errors.append(f"{metric} has no label {sorted(unknown)} in {expr!r}")
        job = matchers.get("job")
        if service_of(metric) and job != ("=", JOBS[service_of(metric)]):
            errors.append(f'{metric} is not scoped to job="{JOBS[service_of(metric)]}" in {expr!r}')
        if metric in BUILTIN_METRICS and (not job or job[0] != "=" or job[1] not in JOBS.values()):
            errors.append(f"{metric} names no job of the stack in {expr!r}")
    if grouping - labels_in_expr:
        errors.append(f"grouping by unknown labels {sorted(grouping - labels_in_expr)} in {expr!r}")
    return errors


# ---- what the component renders --------------------------------------------------------------

def objects(kind: str, overlay: str = WITH_MONITORING[0]) -> list[dict]:
    return policy.of_kind(rendered(overlay), kind)


def alert_rules(overlay: str = WITH_MONITORING[0]) -> list[dict]:
    [rule] = objects("PrometheusRule", overlay)
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs(board: dict) -> list[str]:
    return [t["expr"] for p in board["panels"] for t in p.get("targets", [])]


def test_monitoring_is_an_optional_component():
    assert (COMPONENT / "kustomization.yaml").read_text().count("kind: Component") == 1
    for overlay in OVERLAYS:
        kinds = {o["kind"] for o in rendered(overlay)}
        labelled = [o for o in policy.of_kind(rendered(overlay), "ConfigMap")
                    if "grafana_dashboard" in o["metadata"].get("labels", {})]
        if overlay in WITH_MONITORING:
            assert MONITORING_KINDS <= kinds and len(labelled) == 1, overlay
        else:
            assert not kinds & MONITORING_KINDS and not labelled, overlay


@pytest.mark.parametrize("overlay", WITH_MONITORING)
def test_the_component_renders_into_the_namespace(overlay):
    production = {(o["kind"], o["metadata"]["name"]) for o in rendered("k8s/overlays/production")}
    added = [o for o in rendered(overlay) if (o["kind"], o["metadata"]["name"]) not in production]
    assert sorted((o["kind"], o["metadata"]["name"]) for o in added) == [
        ("ConfigMap", "grafana-dashboard-cifar10"), ("PodMonitor", "worker"), ("PrometheusRule", "cifar10"),
        ("ServiceMonitor", "gateway")]
    for obj in added:
        assert obj["apiVersion"] == ("v1" if obj["kind"] == "ConfigMap" else "monitoring.coreos.com/v1")
        assert obj["metadata"]["namespace"] == "cifar10"
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "cifar10"


def test_the_dashboard_configmap_is_the_file_for_grafanas_sidecar():
    [cm] = [o for o in objects("ConfigMap") if o["metadata"]["name"] == "grafana-dashboard-cifar10"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["data"] == {"cifar10.json": DASHBOARD.read_text()}
    # kubectl apply copies it into the last-applied-configuration annotation: 256 KiB at most.
    assert len(DASHBOARD.read_bytes()) < 200 * 1024


# ---- the Prometheus Operator's kinds, structurally (the CRDs' fields this component uses) ------

ALLOWED = {
    "ServiceMonitor.spec": {"selector", "endpoints", "namespaceSelector", "jobLabel"},
    "PodMonitor.spec": {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel"},
    "endpoint": {"port", "path", "interval", "scrapeTimeout", "relabelings", "metricRelabelings", "scheme"},
    "relabeling": {"sourceLabels", "separator", "targetLabel", "regex", "modulus", "replacement", "action"},
    "PrometheusRule.spec": {"groups"},
    "group": {"name", "rules", "interval"},
    "rule": {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"},
}


def structure_errors(objs) -> list[str]:
    errors = []

    def keys(where, obj, allowed):
        errors.extend(f"{where}: unknown field {k}" for k in set(obj) - ALLOWED[allowed])

    for obj in objs:
        kind, where = obj["kind"], policy.name(obj)
        if kind not in MONITORING_KINDS:
            continue
        keys(where, obj["spec"], f"{kind}.spec")
        if kind == "PrometheusRule":
            for group in obj["spec"]["groups"]:
                keys(where, group, "group")
                for rule in group["rules"]:
                    keys(f"{where} {rule.get('alert')}", rule, "rule")
                    for field in ("for", "keep_firing_for"):
                        if field in rule and not DURATION.match(str(rule[field])):
                            errors.append(f"{where} {rule.get('alert')}: {field} is not a duration")
            continue
        endpoints = obj["spec"]["endpoints" if kind == "ServiceMonitor" else "podMetricsEndpoints"]
        if not endpoints or not obj["spec"]["selector"].get("matchLabels"):
            errors.append(f"{where}: needs endpoints and a selector")
        for endpoint in endpoints:
            keys(where, endpoint, "endpoint")
            for relabeling in endpoint.get("relabelings", []):
                keys(where, relabeling, "relabeling")
            if not DURATION.match(endpoint.get("interval", "1m")):
                errors.append(f"{where}: interval is not a duration")
    return errors


def scrape_jobs(objs) -> dict[str, dict]:
    """{job name: the endpoint} for each endpoint whose relabelings set the job label."""
    jobs = {}
    for obj in objs:
        if obj["kind"] in ("ServiceMonitor", "PodMonitor"):
            key = "endpoints" if obj["kind"] == "ServiceMonitor" else "podMetricsEndpoints"
            for endpoint in obj["spec"][key]:
                for relabeling in endpoint.get("relabelings", []):
                    if relabeling.get("targetLabel") == "job":
                        jobs[relabeling["replacement"]] = endpoint
    return jobs


def monitor_errors(objs) -> list[str]:
    """The ServiceMonitor selects exactly the gateway's Service, on a port it has; the PodMonitor
    exactly the worker's pods, on a port their container declares; each sets its job label."""
    errors = []
    [sm] = policy.of_kind(objs, "ServiceMonitor")
    services = [s for s in policy.of_kind(objs, "Service")
                if policy.selects(sm["spec"]["selector"], s["metadata"].get("labels", {}))]
    if [s["metadata"]["name"] for s in services] != ["gateway"]:
        errors.append(f"ServiceMonitor selects Services {[s['metadata']['name'] for s in services]}, not gateway")
    else:
        ports = {p.get("name") for p in services[0]["spec"]["ports"]}
        errors += [f"ServiceMonitor: Service gateway has no port {e['port']}"
                   for e in sm["spec"]["endpoints"] if e["port"] not in ports]
    [pm] = policy.of_kind(objs, "PodMonitor")
    selected = [w for w in policy.workloads(objs) if policy.selects(pm["spec"]["selector"], policy.pod_labels(w))]
    if [policy.pod_labels(w).get("app") for w in selected] != ["worker"]:
        errors.append(f"PodMonitor selects {[policy.name(w) for w in selected]}, not the worker's pods")
    else:
        ports = {p.get("name") for c in policy.containers(selected[0]) for p in c.get("ports", [])}
        errors += [f"PodMonitor: the worker's pods have no port {e['port']}"
                   for e in pm["spec"]["podMetricsEndpoints"] if e["port"] not in ports]
    if set(scrape_jobs(objs)) != set(JOBS.values()):
        errors.append(f"the monitors set the jobs {sorted(scrape_jobs(objs))}, not {sorted(JOBS.values())}")
    return errors


@pytest.mark.parametrize("overlay", WITH_MONITORING)
def test_the_custom_resources_are_well_formed(overlay):
    assert structure_errors(rendered(overlay)) == []


@pytest.mark.parametrize("overlay", WITH_MONITORING)
def test_the_monitors_scrape_the_gateway_and_the_workers(overlay):
    assert monitor_errors(rendered(overlay)) == []


def test_the_worker_metrics_port_is_its_setting():
    [pm] = objects("PodMonitor")
    worker = policy.workload(rendered(WITH_MONITORING[0]), "worker")
    [port] = [p for c in policy.containers(worker) for p in c.get("ports", [])
              if p["name"] == pm["spec"]["podMetricsEndpoints"][0]["port"]]
    assert str(port["containerPort"]) == read_env_file(K8S_CONFIG / "stack.env")["WORKER_METRICS_PORT"]


# ---- alerts ----------------------------------------------------------------------------------

def test_every_alert_has_a_severity_a_summary_and_a_description():
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)) and all(re.fullmatch(r"Cifar10[A-Za-z0-9]+", n) for n in names)
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        for annotation in ("summary", "description"):
            text = rule["annotations"].get(annotation, "")
            assert len(text.split()) >= 5, f"{rule['alert']}: {annotation} is too short"
            assert text.count("{{") == text.count("}}"), f"{rule['alert']}: unbalanced template in {annotation}"


def uses(rule: dict, metric: str) -> bool:
    return any(name == metric for name, _ in selectors(rule["expr"])[0])


@pytest.mark.parametrize("metrics", [
    {"gateway_queue_depth"}, {"gateway_queue_bytes"}, {"gateway_requests_total"}, {"gateway_model_version"},
    {"up"}, {"gateway_redis_up"}, {"worker_jobs_dead_lettered_total"}, {"worker_model_versions_rejected"},
])
def test_the_alerts_cover(metrics):
    assert any(all(uses(rule, metric) for metric in metrics) for rule in alert_rules())


def rule_named(name: str) -> dict:
    return next(r for r in alert_rules() if r["alert"] == name)


def test_the_alerts_say_what_they_must():
    assert re.search(r'status=~"5\.\."', rule_named("Cifar10PredictErrors")["expr"])
    no_model = rule_named("Cifar10NoModelServed")["expr"]
    assert "== 0" in no_model and "absent(gateway_model_version" in no_model
    workers = rule_named("Cifar10WorkersDown")["expr"]
    assert 'up{job="cifar10-worker"}) == 0' in workers and 'absent(up{job="cifar10-worker"})' in workers
    assert "== 0" in rule_named("Cifar10RedisUnreachable")["expr"]


def test_the_queue_alerts_use_the_gateways_limits():
    """80% of QUEUE_MAXLEN and of QUEUE_MAX_BYTES as the gateway is configured (gateway.env)."""
    gateway = read_env_file(K8S_CONFIG / "gateway.env")
    for name, metric, limit in [("Cifar10QueueNearFull", "gateway_queue_depth", gateway["QUEUE_MAXLEN"]),
                                ("Cifar10QueueBytesNearFull", "gateway_queue_bytes", gateway["QUEUE_MAX_BYTES"])]:
        rule = rule_named(name)
        assert re.search(rf"\b{metric}\b.*\)\s*/\s*{limit}\s*>\s*0\.8$", rule["expr"].strip()), rule["expr"]
        assert DURATION.match(rule["for"]) and rule["for"] != "0m"
        panel_limits = [p["fieldConfig"]["defaults"].get("max") for p in dashboard()["panels"]
                        if any(metric in t["expr"] for t in p["targets"]) and p["type"] == "timeseries"]
        assert panel_limits and all(value == int(limit) for value in panel_limits), (metric, panel_limits)


# ---- PromQL: every metric and label exists ---------------------------------------------------

def all_exprs() -> list[tuple[str, str]]:
    board = dashboard()
    variables = [v["definition"] for v in board["templating"]["list"] if v["type"] == "query"]
    return ([(f"alert {r['alert']}", r["expr"]) for r in alert_rules()]
            + [(f"dashboard: {e}", e) for e in dashboard_exprs(board)]
            + [(f"dashboard variable: {v}", re.fullmatch(r"label_values\((.*), \w+\)", v).group(1))
               for v in variables])


def test_the_declared_metrics_are_read_from_the_source():
    metrics = declared_metrics()
    assert metrics["gateway_requests_total"] == {"endpoint", "status"}
    assert metrics["gateway_predict_seconds_bucket"] == {"le"}
    assert metrics["worker_jobs_total"] == {"outcome"} and metrics["worker_grpc_errors_total"] == {"code"}
    assert {"gateway_queue_depth", "gateway_queue_bytes", "gateway_model_version", "gateway_redis_up",
            "worker_model_version", "worker_model_versions_rejected", "worker_batch_size_bucket"} <= metrics.keys()


def test_every_metric_and_label_in_the_alerts_and_the_dashboard_exists():
    metrics = declared_metrics()
    errors = [f"{where}: {error}" for where, expr in all_exprs() for error in expression_errors(expr, metrics)]
    assert errors == []


@pytest.mark.parametrize("expr, error", [
    ('sum(rate(gateway_request_total{job="cifar10-gateway"}[5m]))', "unknown metric gateway_request_total"),
    ('sum(rate(gateway_requests_total{job="cifar10-gateway", code="500"}[5m]))', "has no label ['code']"),
    ('max(gateway_queue_depth)', 'not scoped to job="cifar10-gateway"'),
    ('max(worker_model_version{job="cifar10-gateway"})', 'not scoped to job="cifar10-worker"'),
    ('histogram_quantil(0.9, sum by (le) (rate(gateway_predict_seconds_bucket{job="cifar10-gateway"}[5m])))',
     "unknown function histogram_quantil"),
    ('sum by (outcom) (rate(worker_jobs_total{job="cifar10-worker"}[5m]))', "grouping by unknown labels"),
    ('max(gateway_queue_depth{job="cifar10-gateway"}', "unbalanced parentheses"),
    ('absent(up{job="worker"} == 1)', "names no job of the stack"),
    ('vector(1)', "no metric"),
])
def test_the_expression_check_catches(expr, error):
    assert any(error in found for found in expression_errors(expr, declared_metrics())), \
        expression_errors(expr, declared_metrics())


def test_the_expression_check_reads_what_the_alerts_use():
    found, grouping = selectors('sum by (namespace) (up{job="cifar10-worker"}) == 0 or absent(up{job="cifar10-worker"})')
    assert found == [("up", {"job": ("=", "cifar10-worker")})] * 2 and grouping == {"namespace"}
    found, _ = selectors('histogram_quantile(0.99, sum by (le) (rate(gateway_predict_seconds_bucket'
                         '{job="cifar10-gateway", namespace=~"$namespace"}[$__rate_interval])))')
    assert found == [("gateway_predict_seconds_bucket", {"job": ("=", "cifar10-gateway"),
                                                         "namespace": ("=~", "$namespace")})]


@pytest.mark.parametrize("breakage, expected", [
    (lambda objs: policy.get(objs, "ServiceMonitor", "gateway")["spec"]["selector"]["matchLabels"].update(app="gw"),
     "ServiceMonitor selects Services []"),
    (lambda objs: policy.get(objs, "ServiceMonitor", "gateway")["spec"]["endpoints"][0].update(port="metrics"),
     "Service gateway has no port metrics"),
    (lambda objs: policy.get(objs, "PodMonitor", "worker")["spec"]["podMetricsEndpoints"][0].update(port="http"),
     "the worker's pods have no port http"),
    (lambda objs: policy.get(objs, "PodMonitor", "worker")["spec"]["podMetricsEndpoints"][0].pop("relabelings"),
     "the monitors set the jobs ['cifar10-gateway']"),
])
def test_the_monitor_check_catches(breakage, expected):
    import copy
    objs = copy.deepcopy(list(rendered(WITH_MONITORING[0])))
    breakage(objs)
    assert any(expected in e for e in monitor_errors(objs)), monitor_errors(objs)


def test_the_structure_check_catches_a_misspelt_field():
    import copy
    objs = copy.deepcopy(list(rendered(WITH_MONITORING[0])))
    rule = policy.get(objs, "PrometheusRule", "cifar10")["spec"]["groups"][0]["rules"][0]
    rule["annotation"] = rule.pop("annotations")
    rule["for"] = "5 minutes"
    errors = structure_errors(objs)
    assert any("unknown field annotation" in e for e in errors) and any("not a duration" in e for e in errors)


# ---- the dashboard ---------------------------------------------------------------------------

def test_the_dashboard_is_importable_grafana_json():
    board = dashboard()
    assert board["uid"] == "cifar10-serving" and board["title"] and board["schemaVersion"] >= 36
    assert "id" not in board or board["id"] is None  # an id would clash with the importing Grafana's
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for panel in board["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        assert panel["targets"] and all(t["refId"] and t["expr"] for t in panel["targets"])
        assert all('namespace=~"$namespace"' in t["expr"] for t in panel["targets"]), panel["title"]


@pytest.mark.parametrize("metric", [
    "gateway_requests_total", "gateway_predict_seconds_bucket", "gateway_queue_depth", "gateway_queue_bytes",
    "worker_batch_size_bucket", "worker_jobs_total", "worker_grpc_errors_total", "worker_jobs_dead_lettered_total",
    "gateway_model_version", "worker_model_version", "worker_model_versions_rejected", "gateway_redis_up",
])
def test_the_dashboard_shows(metric):
    assert any(metric in (name for name, _ in selectors(expr)[0]) for expr in dashboard_exprs(dashboard()))


def panel_titled(fragment: str) -> dict:
    [panel] = [p for p in dashboard()["panels"] if fragment in p["title"]]
    return panel


def test_the_dashboard_panels_compute_what_they_say():
    requests = panel_titled("Requests by status")["targets"]
    assert [t["legendFormat"] for t in requests] == ["{{status}}"] and "sum by (status) (rate(" in requests[0]["expr"]
    latency = panel_titled("Latency")["targets"]
    assert [re.match(r"histogram_quantile\((0\.\d+), sum by \(le\) \(rate\(gateway_predict_seconds_bucket\{", t["expr"])
            .group(1) for t in latency] == ["0.5", "0.9", "0.99"]
    assert panel_titled("Latency")["fieldConfig"]["defaults"]["unit"] == "s"
    assert "sum by (outcome)" in panel_titled("Jobs by outcome")["targets"][0]["expr"]
    assert panel_titled("Queue size")["fieldConfig"]["defaults"]["unit"] == "bytes"
