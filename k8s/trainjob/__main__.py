"""make train-k8s: python -m k8s.trainjob --config default [--epochs 5] [--precision mixed_bfloat16]
    [--gpus 8] [--nodes 2] [--scale-batch] [--backend jax] [--namespace cifar10]

Creates a training Job from the deployed `trainer` CronJob, follows its logs and exits 0 when
it completes, 1 when it fails or times out. --gpus N gives the pod N GPUs (MirroredStrategy);
--nodes M makes it M such pods, an Indexed Job with a headless Service (MultiWorkerMirroredStrategy):
one run on N x M GPUs (training/run/distribute.py). --dry-run with --template-file prints the
manifests without a cluster: kubectl kustomize k8s | python -m k8s.trainjob --dry-run --template-file -
"""
import argparse
import json
import sys

import yaml

from k8s.trainjob import BACKENDS, TEMPLATE, Cluster, distributed_job, follow, job_name
from training.recipe.configs import CONFIGS, PRECISIONS


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m k8s.trainjob", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # The image is built from this checkout, so its configs are the ones it knows: a typo fails
    # here rather than in a pod after the image pull.
    p.add_argument("--config", default="default", choices=sorted(CONFIGS))
    p.add_argument("--epochs", type=int, help="override the config's epoch count")
    p.add_argument("--precision", choices=PRECISIONS, help="override the config's precision "
                   "(mixed_bfloat16: about twice as fast on recent GPUs)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs per pod (default 1)")
    p.add_argument("--nodes", type=int, default=1, help="pods, one per node, training one model together")
    p.add_argument("--scale-batch", action="store_true", help="each GPU takes the config's batch (global "
                   "batch x GPUs, learning rate scaled); default: the config's batch is split over the GPUs")
    p.add_argument("--backend", choices=BACKENDS, help="KERAS_BACKEND of the run (default: the image's, "
                   "tensorflow); jax runs the trainer image built with BACKEND=jax, tagged <tag>-jax")
    p.add_argument("--namespace", default="cifar10")
    p.add_argument("--context", help="kubeconfig context (default: the current one)")
    p.add_argument("--template", default=TEMPLATE, help="name of the CronJob used as template")
    p.add_argument("--template-file", help="read the CronJob from this rendered manifest "
                   "('-' for stdin) instead of the cluster")
    p.add_argument("--dry-run", action="store_true", help="print the Job, create nothing")
    p.add_argument("--no-follow", action="store_true", help="create the Job and return")
    p.add_argument("--timeout", type=float, default=86400, help="seconds to wait (default 1 day)")
    return p.parse_args(argv)


def cronjob_from_file(path: str, name: str) -> dict:
    stream = sys.stdin if path == "-" else open(path)
    with stream:
        for doc in yaml.safe_load_all(stream):
            if doc and doc.get("kind") == "CronJob" and doc["metadata"]["name"] == name:
                return doc
    raise SystemExit(f"no CronJob {name!r} in {path}")


def print_manifests(objects, out):
    """One object as JSON; several as a YAML stream of JSON documents (kubectl apply -f reads both)."""
    out.write("---\n".join(json.dumps(o, indent=2) + "\n" for o in objects))


def create_owned(cluster, namespace, job, owned):
    """Creates the Job, then the objects it owns (garbage-collected with it)."""
    uid = cluster.create_job(namespace, job)
    for obj in owned:
        if uid:
            obj["metadata"]["ownerReferences"] = [{"apiVersion": "batch/v1", "kind": "Job", "name": job["metadata"]["name"],
                                                   "uid": uid, "blockOwnerDeletion": True}]
        cluster.create_service(namespace, obj)


def main(argv=None, cluster_factory=Cluster, out=sys.stdout) -> int:
    args = parse_args(argv)
    cluster = None if args.template_file else cluster_factory(args.context)
    cronjob = (cronjob_from_file(args.template_file, args.template) if args.template_file
               else cluster.cronjob(args.namespace, args.template))
    name = job_name(args.config)
    try:
        job, *owned = distributed_job(cronjob, name, args.config, args.gpus, args.nodes, args.epochs,
                                      args.precision, args.scale_batch, backend=args.backend)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}")
    if args.dry_run:
        print_manifests([job, *owned], out)
        return 0
    if cluster is None:
        raise SystemExit("--template-file creates nothing without --dry-run")
    create_owned(cluster, args.namespace, job, owned)
    shape = f", {args.nodes} pods x {args.gpus} GPUs" if args.nodes > 1 else (f", {args.gpus} GPUs" if args.gpus > 1 else "")
    backend = f", backend {args.backend}" if args.backend else ""
    out.write(f"created job/{name} in namespace {args.namespace} (config {args.config}{shape}{backend})\n")
    if args.no_follow:
        out.write(f"follow it with: kubectl -n {args.namespace} logs -f job/{name}\n")
        return 0
    try:
        ok, reason = follow(cluster, args.namespace, name, out=out, timeout_s=args.timeout)
    except KeyboardInterrupt:
        out.write(f"\nstopped following; job/{name} keeps running "
                  f"(kubectl -n {args.namespace} delete job {name} to stop it)\n")
        return 130
    out.write(f"job/{name}: {reason}\n")
    if ok:
        out.write("TF Serving loads the new model version within seconds "
                  f"(kubectl -n {args.namespace} logs deploy/tfserving)\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
