"""Kubernetes deployment: manifests (kustomize), the train-k8s tool (trainjob) and their tests."""
