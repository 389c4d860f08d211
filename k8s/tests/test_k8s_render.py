"""Every kustomization renders with the real kubectl, and every object passes the Kubernetes
API schemas of K8S_VERSION in strict mode (unknown fields are errors), offline."""
import copy

import pytest
from kubernetes_validate import utils as kv

from k8s.tests.manifests import K8S, K8S_VERSION, NAMESPACE, OVERLAYS, ROOT, rendered

# Custom resources have no schema in kubernetes-validate; policy tests check their contents.
# (test_monitoring checks the Prometheus Operator's kinds structurally.)
CRDS = {("keda.sh/v1alpha1", "ScaledObject"), ("keda.sh/v1alpha1", "TriggerAuthentication"),
        ("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PodMonitor"),
        ("monitoring.coreos.com/v1", "PrometheusRule")}


def test_every_kustomization_is_checked():
    found = {str(p.parent.relative_to(ROOT)) for p in K8S.rglob("kustomization.yaml")
             if "components" not in p.parts}
    assert found == set(OVERLAYS)


def test_default_is_production():
    assert rendered("k8s") == rendered("k8s/overlays/production")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renders_a_complete_stack(overlay):
    kinds = {(o["kind"], o["metadata"]["name"]) for o in rendered(overlay)}
    for expected in [("Namespace", NAMESPACE), ("StatefulSet", "redis"),
                     ("Deployment", "tfserving"), ("Deployment", "worker"),
                     ("Deployment", "gateway"), ("CronJob", "trainer"), ("Ingress", "gateway"),
                     ("Deployment", "gateway-errors"), ("Service", "gateway-errors"),
                     ("PersistentVolumeClaim", "models")]:
        assert expected in kinds


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_schemas_strict(overlay):
    errors = []
    for obj in rendered(overlay):
        try:
            assert kv.validate(obj, K8S_VERSION, strict=True) == "1.32"
        except kv.SchemaNotFoundError:
            if (obj["apiVersion"], obj["kind"]) not in CRDS:
                errors.append(f"{obj['kind']}/{obj['metadata']['name']}: no schema")
        except kv.ValidationError as e:
            path = ".".join(map(str, e.path))
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {e.message}")
    assert errors == []


def _gateway(objs):
    return copy.deepcopy(next(o for o in objs if o["kind"] == "Deployment"
                              and o["metadata"]["name"] == "gateway"))


def test_schema_check_rejects_unknown_field():
    broken = _gateway(rendered("k8s"))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}  # case typo
    with pytest.raises(kv.ValidationError, match="livenessprobe"):
        kv.validate(broken, K8S_VERSION, strict=True)


def test_schema_check_rejects_wrong_type():
    broken = _gateway(rendered("k8s"))
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "5000"
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, K8S_VERSION, strict=True)
