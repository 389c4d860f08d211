"""make study-k8s: python -m k8s.trainjob.study --configs base1,base3 --seeds 0,1,2 [--parallelism 4]
    [--epochs 10] [--retries 2] [--namespace cifar10]

Creates the study as one Indexed Job from the deployed `trainer` CronJob (k8s.trainjob.study_job):
one pod per configuration and seed, `--parallelism` at once, each with the template's GPU; a
failed run is retried alone. Follows the Job's progress, then prints STUDY.md (mean ± std over
the seeds) as the last run wrote it into /runs/<job>/STUDY.md; exits 0 when every run
succeeded. --dry-run with --template-file prints the Job without a cluster:
    kubectl kustomize k8s | python -m k8s.trainjob.study --dry-run --template-file - --configs base1
"""
import argparse
import sys

from k8s.trainjob import TEMPLATE, Cluster, follow_indexed, job_name, study_job
from k8s.trainjob.__main__ import cronjob_from_file, print_manifests
from training.recipe.configs import CONFIGS, SEED_STUDY


def names(text):
    values = [v for v in text.split(",") if v]
    unknown = [v for v in values if v not in CONFIGS]
    if unknown or not values:
        raise argparse.ArgumentTypeError(f"unknown config {', '.join(unknown) or '(none)'}; choose from {', '.join(CONFIGS)}")
    return values


def seeds(text):
    try:
        return [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds are comma-separated integers, not {text!r}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m k8s.trainjob.study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", type=names, default=list(SEED_STUDY), help="comma-separated (default: the seed's study)")
    p.add_argument("--seeds", type=seeds, help="comma-separated; every configuration runs once per seed "
                   "(default: each configuration's own seed)")
    p.add_argument("--parallelism", type=int, default=1, help="runs at once (default 1)")
    p.add_argument("--epochs", type=int, help="epoch budget of every configuration")
    p.add_argument("--retries", type=int, help="retries of a failed run (default: the template's backoffLimit)")
    p.add_argument("--namespace", default="cifar10")
    p.add_argument("--context", help="kubeconfig context (default: the current one)")
    p.add_argument("--template", default=TEMPLATE, help="name of the CronJob used as template")
    p.add_argument("--template-file", help="read the CronJob from this rendered manifest ('-' for stdin)")
    p.add_argument("--dry-run", action="store_true", help="print the Job, create nothing")
    p.add_argument("--no-follow", action="store_true", help="create the Job and return")
    p.add_argument("--timeout", type=float, default=7 * 86400, help="seconds to wait (default 7 days)")
    return p.parse_args(argv)


def main(argv=None, cluster_factory=Cluster, out=sys.stdout) -> int:
    args = parse_args(argv)
    cluster = None if args.template_file else cluster_factory(args.context)
    cronjob = (cronjob_from_file(args.template_file, args.template) if args.template_file
               else cluster.cronjob(args.namespace, args.template))
    label = args.configs[0] if len(args.configs) == 1 else f"{len(args.configs)}configs"
    name = job_name(label, kind="study")
    try:
        job = study_job(cronjob, name, args.configs, args.seeds, args.parallelism, args.epochs, args.retries)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}")
    if args.dry_run:
        print_manifests([job], out)
        return 0
    if cluster is None:
        raise SystemExit("--template-file creates nothing without --dry-run")
    cluster.create_job(args.namespace, job)
    runs = job["spec"]["completions"]
    out.write(f"created job/{name} in namespace {args.namespace}: {runs} runs, {job['spec']['parallelism']} at "
              f"a time; STUDY.md in /runs/{name}/ on the trainer-runs volume\n")
    if args.no_follow:
        out.write(f"follow it with: kubectl -n {args.namespace} get job {name} -w\n")
        return 0
    try:
        ok, reason = follow_indexed(cluster, args.namespace, name, runs, out=out, timeout_s=args.timeout)
    except KeyboardInterrupt:
        out.write(f"\nstopped following; job/{name} keeps running "
                  f"(kubectl -n {args.namespace} delete job {name} to stop it)\n")
        return 130
    out.write(f"job/{name}: {reason}\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
