#!/usr/bin/env python3
"""Turns a rendered overlay into what `podman kube play` (podman 4.3) takes.
Used by deploy/run-containers.sh kube.

    podman-play.py split RENDERED OUT --rabbitmq-image IMAGE --tag TAG
    podman-play.py secrets OUT --users FILE --accounts FILE --ca FILE
    podman-play.py grace PLAYED_YAML DEPLOYMENT

split writes OUT/herald.yaml (the Deployments as rendered, but for the
image tag and the ports lists, see without_host_ports), OUT/rabbitmq.yaml (the dev broker's StatefulSet as a Pod,
its claim as a named volume: kube play knows no StatefulSets), OUT/configmaps/
and OUT/overlay-secrets.json (the Secrets the overlay generates).

secrets writes OUT/secrets/NAME, one podman secret each, in the two formats
podman 4.3 reads: for `env.valueFrom.secretKeyRef` a JSON map of base64
values; for a `secret` volume a Secret whose `data` holds the files as they
are (podman 4.3 writes them without decoding, and ignores `items` and
`defaultMode`).

What kube play leaves out (podman 4.3): Services (pods reach each other by
name on the network), HorizontalPodAutoscaler, PodDisruptionBudget,
NetworkPolicy, ServiceAccount, Namespace; readiness and startup probes, and
liveness probes need systemd timers to run. deploy/validate.sh checks those
objects against the Kubernetes schemas instead.
"""

import argparse
import base64
import json
import os
import sys

import yaml


def without_host_ports(pod_spec):
    """podman 4.3 publishes every containerPort on the host (a second pod
    with the same port, or a host service on it, then fails to start). In
    Kubernetes the list only names ports: drop it and resolve the names that
    probes use, so the pods are reached at their own addresses."""
    for c in pod_spec["containers"]:
        named = {p["name"]: p["containerPort"] for p in c.pop("ports", []) if "name" in p}
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            action = (c.get(probe) or {}).get("httpGet") or (c.get(probe) or {}).get("tcpSocket")
            if action and action.get("port") in named:
                action["port"] = named[action["port"]]


def split(args):
    docs = [d for d in yaml.safe_load_all(open(args.rendered)) if d]
    os.makedirs(os.path.join(args.out, "configmaps"), exist_ok=True)
    deployments, secrets = [], {}
    for doc in docs:
        kind, name = doc["kind"], doc["metadata"]["name"]
        if kind == "ConfigMap":
            with open(os.path.join(args.out, "configmaps", f"{name}.yaml"), "w") as f:
                yaml.safe_dump(doc, f)
        elif kind == "Secret":
            data = {k: v for k, v in (doc.get("stringData") or {}).items()}
            data.update({k: base64.b64decode(v).decode() for k, v in (doc.get("data") or {}).items()})
            secrets[name] = data
        elif kind == "Deployment":
            for c in doc["spec"]["template"]["spec"]["containers"]:
                # The overlay pins "dev"; build-local.sh tags HERALD_IMAGE_TAG.
                if c["image"].startswith("ghcr.io/herald-xmpp/"):
                    c["image"] = c["image"].split(":")[0] + ":" + args.tag
            without_host_ports(doc["spec"]["template"]["spec"])
            deployments.append(doc)
        elif kind == "StatefulSet" and name == "rabbitmq":
            spec = doc["spec"]["template"]["spec"]
            for c in spec["containers"]:
                c["image"] = args.rabbitmq_image
            # A named volume per claim, as the StatefulSet controller would
            # make; podman gives a new one the image's ownership of the
            # mount point (it has no fsGroup).
            claims = [t["metadata"]["name"] for t in doc["spec"].get("volumeClaimTemplates", [])]
            spec.setdefault("volumes", []).extend(
                {"name": n, "persistentVolumeClaim": {"claimName": f"{n}-{name}-0"}} for n in claims)
            without_host_ports(spec)
            pod = {"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": name, "labels": doc["spec"]["template"]["metadata"]["labels"]},
                   "spec": spec}
            with open(os.path.join(args.out, "rabbitmq.yaml"), "w") as f:
                yaml.safe_dump(pod, f)
    with open(os.path.join(args.out, "herald.yaml"), "w") as f:
        yaml.safe_dump_all(deployments, f)
    with open(os.path.join(args.out, "overlay-secrets.json"), "w") as f:
        json.dump(secrets, f)


def secrets(args):
    out = os.path.join(args.out, "secrets")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(args.out, "overlay-secrets.json")) as f:
        for name, data in json.load(f).items():
            encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
            with open(os.path.join(out, name), "w") as g:
                json.dump(encoded, g)

    def volume_secret(name, key, path, configmap=False):
        with open(path) as f:
            doc = {"apiVersion": "v1", "kind": "ConfigMap" if configmap else "Secret",
                   "metadata": {"name": name}, "data": {key: f.read()}}
        return doc

    for name, key, path in (("herald-ingress-users", "users.toml", args.users),
                            ("herald-relay-accounts", "accounts.toml", args.accounts)):
        with open(os.path.join(out, name), "w") as f:
            yaml.safe_dump(volume_secret(name, key, path), f)
    with open(os.path.join(args.out, "configmaps", "herald-private-ca.yaml"), "w") as f:
        yaml.safe_dump(volume_secret("herald-private-ca", "ca.pem", args.ca, configmap=True), f)


def grace(args):
    for doc in yaml.safe_load_all(open(args.played)):
        if doc and doc["metadata"]["name"] == args.deployment:
            print(doc["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30))
            return 0
    print(f"no Deployment {args.deployment}", file=sys.stderr)
    return 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("split")
    p.add_argument("rendered")
    p.add_argument("out")
    p.add_argument("--rabbitmq-image", required=True)
    p.add_argument("--tag", required=True)
    p.set_defaults(run=split)
    p = sub.add_parser("secrets")
    p.add_argument("out")
    p.add_argument("--users", required=True)
    p.add_argument("--accounts", required=True)
    p.add_argument("--ca", required=True)
    p.set_defaults(run=secrets)
    p = sub.add_parser("grace")
    p.add_argument("played")
    p.add_argument("deployment")
    p.set_defaults(run=grace)
    args = ap.parse_args()
    return args.run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
