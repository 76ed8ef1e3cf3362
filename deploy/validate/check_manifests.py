#!/usr/bin/env python3
"""Offline checks of Herald's rendered Kubernetes manifests.

    check_manifests.py --k8s-version 1.30.0 [--k8s-version …]
                       --external-secrets deploy/k8s/examples/secrets.example.yaml
                       NAME=rendered.yaml …

1. Every built-in object is validated against the Kubernetes OpenAPI schema
   of each given version, strictly (an unknown field such as `replica:` is an
   error), with the PyPI package kubernetes-validate.
2. Custom resources (ServiceMonitor, ScaledObject, TriggerAuthentication,
   RabbitmqCluster) are checked for shape: known top-level spec fields,
   required fields, types; embedded Kubernetes types (resources, affinity,
   HPA behavior) go through the real schemas.
3. Cross-references a schema cannot see: selectors that select something,
   named ports, ConfigMaps, Secrets and keys, probe ports, scale targets, and
   Herald's own rules (admin port = HERALD_ADMIN_LISTEN, the relay's grace
   period outlasts HERALD_DRAIN_TIMEOUT, restricted security context).

Secrets that the operator creates by hand are taken from the example file
(--external-secrets): their names and keys must match what the manifests
reference, and the TOML files in them must parse.
"""

import argparse
import copy
import re
import sys

import jsonschema
import kubernetes_validate
import yaml

from herald_files import check_accounts, check_users

CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "PersistentVolume", "StorageClass", "PriorityClass"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet"}
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


# --------------------------------------------------------------------------
# custom resources: shape

# ConfigMaps that operators create from their own files, like the Secrets
# (components/private-ca: the CA certificates to trust).
EXTERNAL_CONFIGMAPS = {"herald-private-ca"}


def obj(properties, required=(), extra=False):
    return {"type": "object", "properties": properties, "required": list(required),
            "additionalProperties": extra}


STR = {"type": "string"}
INT = {"type": "integer"}
BOOL = {"type": "boolean"}
ANY_OBJ = {"type": "object"}
LABEL_SELECTOR = obj({"matchLabels": {"type": "object", "additionalProperties": STR},
                      "matchExpressions": {"type": "array", "items": ANY_OBJ}})
METADATA = {"type": "object", "required": ["name"],
            "properties": {"name": STR, "namespace": STR,
                           "labels": {"type": "object", "additionalProperties": STR},
                           "annotations": {"type": "object", "additionalProperties": STR}}}


def resource(spec, required_spec=True):
    return obj({"apiVersion": STR, "kind": STR, "metadata": METADATA, "spec": spec},
               ["apiVersion", "kind", "metadata"] + (["spec"] if required_spec else []))


CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): resource(obj({
        "selector": LABEL_SELECTOR,
        "namespaceSelector": obj({"any": BOOL, "matchNames": {"type": "array", "items": STR}}),
        "endpoints": {"type": "array", "minItems": 1, "items": obj({
            "port": STR, "targetPort": {"type": ["string", "integer"]}, "path": STR, "scheme": STR,
            "interval": STR, "scrapeTimeout": STR, "honorLabels": BOOL, "honorTimestamps": BOOL,
            "params": ANY_OBJ, "relabelings": {"type": "array"}, "metricRelabelings": {"type": "array"},
            "tlsConfig": ANY_OBJ, "bearerTokenSecret": ANY_OBJ, "basicAuth": ANY_OBJ,
            "authorization": ANY_OBJ, "followRedirects": BOOL, "enableHttp2": BOOL,
            "filterRunning": BOOL, "proxyUrl": STR, "oauth2": ANY_OBJ,
        })},
        "jobLabel": STR, "targetLabels": {"type": "array", "items": STR},
        "podTargetLabels": {"type": "array", "items": STR}, "sampleLimit": INT,
        "targetLimit": INT, "labelLimit": INT, "attachMetadata": ANY_OBJ,
        "scrapeProtocols": {"type": "array", "items": STR},
    }, ["selector", "endpoints"])),
    ("keda.sh/v1alpha1", "ScaledObject"): resource(obj({
        "scaleTargetRef": obj({"apiVersion": STR, "kind": STR, "name": STR,
                               "envSourceContainerName": STR}, ["name"]),
        "pollingInterval": INT, "cooldownPeriod": INT, "initialCooldownPeriod": INT,
        "idleReplicaCount": INT, "minReplicaCount": INT, "maxReplicaCount": INT,
        "fallback": obj({"failureThreshold": INT, "replicas": INT, "behavior": STR}, ["failureThreshold", "replicas"]),
        "advanced": obj({
            "restoreToOriginalReplicaCount": BOOL,
            "horizontalPodAutoscalerConfig": obj({"name": STR, "behavior": ANY_OBJ}),
            "scalingModifiers": ANY_OBJ,
        }),
        "triggers": {"type": "array", "minItems": 1, "items": obj({
            "type": STR, "name": STR, "metadata": {"type": "object", "additionalProperties": STR},
            "authenticationRef": obj({"name": STR, "kind": {"enum": ["TriggerAuthentication",
                                                                     "ClusterTriggerAuthentication"]}},
                                     ["name"]),
            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
            "useCachedMetrics": BOOL,
        }, ["type", "metadata"])},
    }, ["scaleTargetRef", "triggers"])),
    ("keda.sh/v1alpha1", "TriggerAuthentication"): resource(obj({
        "secretTargetRef": {"type": "array", "items": obj({"parameter": STR, "name": STR, "key": STR},
                                                          ["parameter", "name", "key"])},
        "configMapTargetRef": {"type": "array", "items": obj({"parameter": STR, "name": STR, "key": STR},
                                                             ["parameter", "name", "key"])},
        "env": {"type": "array"}, "podIdentity": ANY_OBJ, "hashiCorpVault": ANY_OBJ,
        "azureKeyVault": ANY_OBJ, "awsSecretManager": ANY_OBJ, "gcpSecretManager": ANY_OBJ,
        "boundServiceAccountToken": {"type": "array"},
    })),
    ("rabbitmq.com/v1beta1", "RabbitmqCluster"): resource(obj({
        "replicas": {"type": "integer", "minimum": 0}, "image": STR,
        "imagePullSecrets": {"type": "array"}, "service": obj({"type": {"enum": ["ClusterIP", "LoadBalancer", "NodePort"]},
                                                               "annotations": ANY_OBJ, "ipFamilyPolicy": STR}),
        "persistence": obj({"storageClassName": STR, "storage": {"type": ["string", "integer"]}}),
        "resources": ANY_OBJ, "affinity": ANY_OBJ, "tolerations": {"type": "array"},
        "rabbitmq": obj({"additionalPlugins": {"type": "array", "items": {"type": "string", "pattern": r"^\w+$"}},
                         "additionalConfig": {"type": "string", "maxLength": 2000},
                         "advancedConfig": STR, "envConfig": STR, "erlangInetConfig": STR}),
        "tls": obj({"secretName": STR, "caSecretName": STR, "disableNonTLSListeners": BOOL}),
        "override": obj({"statefulSet": ANY_OBJ, "service": ANY_OBJ}),
        "skipPostDeploySteps": BOOL, "terminationGracePeriodSeconds": INT, "delayStartSeconds": INT,
        "autoEnableAllFeatureFlags": BOOL, "secretBackend": ANY_OBJ,
    }, ["replicas"])),
}


def wrap_pod_spec(pod_spec_fields, resources=None):
    """A throwaway Pod carrying embedded core types, for the real schema."""
    container = {"name": "c", "image": "x"}
    if resources is not None:
        container["resources"] = resources
    spec = {"containers": [container]}
    spec.update(pod_spec_fields)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": spec}


def embedded_core_objects(doc):
    """(label, object) pairs of built-in types embedded in a custom resource."""
    kind, spec = doc["kind"], doc.get("spec") or {}
    if kind == "RabbitmqCluster":
        fields = {k: spec[k] for k in ("affinity", "tolerations") if k in spec}
        if fields or "resources" in spec:
            yield "spec.affinity/tolerations/resources", wrap_pod_spec(fields, spec.get("resources"))
    if kind == "ScaledObject":
        behavior = ((spec.get("advanced") or {}).get("horizontalPodAutoscalerConfig") or {}).get("behavior")
        if behavior is not None:
            yield "spec.advanced.horizontalPodAutoscalerConfig.behavior", {
                "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "x"},
                "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "x"}, "maxReplicas": 1,
                         "behavior": behavior}}
    if kind == "ServiceMonitor":
        yield "spec.selector", {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                                "metadata": {"name": "x"}, "spec": {"selector": spec.get("selector")}}


def crd_specific(doc):
    errors = []
    spec = doc.get("spec") or {}
    if doc["kind"] == "ScaledObject":
        lo, hi = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
        if lo > hi:
            errors.append(f"minReplicaCount {lo} > maxReplicaCount {hi}")
        for t in spec.get("triggers", []):
            if t.get("type") == "rabbitmq":
                md = t.get("metadata", {})
                if "queueName" not in md:
                    errors.append("rabbitmq trigger without queueName")
                if md.get("mode") not in ("QueueLength", "MessageRate"):
                    errors.append("rabbitmq trigger mode must be QueueLength or MessageRate")
                if "value" not in md:
                    errors.append("rabbitmq trigger without value")
                elif not re.fullmatch(r"\d+(\.\d+)?", md["value"]):
                    errors.append(f"rabbitmq trigger value {md['value']!r} is not a number")
                if md.get("protocol", "auto") not in ("auto", "amqp", "http"):
                    errors.append("rabbitmq trigger protocol must be auto, amqp or http")
                if not ({"host", "hostFromEnv"} & set(md)) and "authenticationRef" not in t:
                    errors.append("rabbitmq trigger has no host, hostFromEnv or authenticationRef")
    if doc["kind"] == "RabbitmqCluster" and spec.get("replicas", 1) not in (1, 3, 5):
        errors.append("RabbitmqCluster replicas should be 1, 3 or 5 (the tested sizes)")
    return errors


# --------------------------------------------------------------------------
# helpers

def ident(doc):
    md = doc.get("metadata") or {}
    return f"{doc.get('kind')}/{md.get('name')}"


def selector_matches(selector, labels):
    if selector is None:
        return False
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def pod_spec(doc):
    return doc["spec"]["template"]["spec"]


def pod_labels(doc):
    return (doc["spec"]["template"].get("metadata") or {}).get("labels") or {}


def containers(doc, init=True):
    spec = pod_spec(doc)
    return list(spec.get("containers") or []) + (list(spec.get("initContainers") or []) if init else [])


def parse_duration(text):
    """humantime-ish: 20s, 2m, 1h30m, 500ms -> seconds (float)."""
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    total, pos = 0.0, 0
    for m in re.finditer(r"\s*(\d+(?:\.\d+)?)\s*([a-z]+)", text):
        if m.start() != pos or m.group(2) not in units:
            raise ValueError(text)
        total += float(m.group(1)) * units[m.group(2)]
        pos = m.end()
    if pos != len(text) or pos == 0:
        raise ValueError(text)
    return total


def listen_port(value):
    m = re.fullmatch(r"(?:\[[0-9a-fA-F:.]+\]|[^:]+):(\d+)", value or "")
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------
# the checks of one rendered overlay

class Overlay:
    def __init__(self, name, docs, external_secrets):
        self.name = name
        self.docs = docs
        self.errors = []
        self.by_kind = {}
        for d in docs:
            self.by_kind.setdefault(d["kind"], []).append(d)
        # Secrets: rendered ones, else the hand-made ones from the example file.
        self.secrets = {d["metadata"]["name"]: d for d in self.by_kind.get("Secret", [])}
        for name, secret in external_secrets.items():
            self.secrets.setdefault(name, secret)
        self.configmaps = {d["metadata"]["name"]: d for d in self.by_kind.get("ConfigMap", [])}

    def err(self, doc, message):
        self.errors.append(f"{self.name}: {ident(doc) if doc else '-'}: {message}")

    def workloads(self):
        return [d for k in WORKLOAD_KINDS for d in self.by_kind.get(k, [])]

    def named(self, kind, name):
        for d in self.by_kind.get(kind, []):
            if d["metadata"]["name"] == name:
                return d
        return None

    @staticmethod
    def data_keys(obj_):
        return set((obj_.get("data") or {})) | set((obj_.get("stringData") or {}))

    # ---- schema -----------------------------------------------------------

    def check_schemas(self, versions):
        for d in self.docs:
            key = (d.get("apiVersion"), d.get("kind"))
            if key in CRD_SCHEMAS:
                for e in jsonschema.Draft7Validator(CRD_SCHEMAS[key]).iter_errors(d):
                    path = ".".join(str(p) for p in e.absolute_path) or "(top)"
                    self.err(d, f"shape: {path}: {e.message}")
                for label, embedded in embedded_core_objects(d):
                    for v in versions:
                        try:
                            kubernetes_validate.validate(embedded, v, strict=True)
                        except kubernetes_validate.ValidationError as e:
                            path = ".".join(str(p) for p in e.path)
                            self.err(d, f"{label} (as {embedded['kind']}, Kubernetes {v}): {path}: {e.message}")
                for message in crd_specific(d):
                    self.err(d, message)
                continue
            for v in versions:
                try:
                    kubernetes_validate.validate(d, v, strict=True)
                except kubernetes_validate.SchemaNotFoundError:
                    self.err(d, f"no Kubernetes {v} schema for {key[0]} {key[1]}, and no shape check either")
                except kubernetes_validate.ValidationError as e:
                    path = ".".join(str(p) for p in e.path) or "(top)"
                    self.err(d, f"Kubernetes {v} schema: {path}: {e.message}")

    # ---- metadata -----------------------------------------------------------

    def check_metadata(self):
        seen = set()
        namespaces = {d["metadata"]["name"] for d in self.by_kind.get("Namespace", [])}
        for d in self.docs:
            md = d["metadata"]
            name = md["name"]
            if not DNS1123_SUBDOMAIN.match(name) or len(name) > 253:
                self.err(d, f"name {name!r} is not a DNS-1123 subdomain")
            if d["kind"] in ("Service", "Namespace") and (not DNS1123_LABEL.match(name) or len(name) > 63):
                self.err(d, f"name {name!r} is not a DNS-1123 label")
            key = (d["apiVersion"].split("/")[0] if "/" in d["apiVersion"] else "", d["kind"],
                   md.get("namespace"), name)
            if key in seen:
                self.err(d, "defined twice")
            seen.add(key)
            if d["kind"] not in CLUSTER_SCOPED:
                ns = md.get("namespace")
                if not ns:
                    self.err(d, "no namespace (the overlay must set one)")
                elif namespaces and ns not in namespaces:
                    self.err(d, f"namespace {ns!r} is not the overlay's Namespace {sorted(namespaces)}")

    # ---- workloads ----------------------------------------------------------

    def check_workloads(self):
        for w in self.workloads():
            spec = w["spec"]
            sel = spec.get("selector")
            if not sel or not selector_matches(sel, pod_labels(w)):
                self.err(w, "spec.selector does not match the pod template's labels")
            if w["kind"] == "StatefulSet":
                svc = self.named("Service", spec.get("serviceName", ""))
                if svc is None:
                    self.err(w, f"serviceName {spec.get('serviceName')!r}: no such Service")
                elif svc["spec"].get("clusterIP") != "None":
                    self.err(w, f"serviceName {svc['metadata']['name']!r} is not headless")
            ps = pod_spec(w)
            volumes = {v["name"]: v for v in ps.get("volumes") or []}
            claim_names = {c["metadata"]["name"] for c in spec.get("volumeClaimTemplates") or []}
            sa = ps.get("serviceAccountName")
            if sa and self.named("ServiceAccount", sa) is None and sa != "default":
                self.err(w, f"serviceAccountName {sa!r}: no such ServiceAccount")
            for v in volumes.values():
                if "secret" in v:
                    self.check_ref(w, "Secret", v["secret"].get("secretName"),
                                   [i["key"] for i in v["secret"].get("items") or []],
                                   optional=v["secret"].get("optional", False))
                if "configMap" in v:
                    self.check_ref(w, "ConfigMap", v["configMap"].get("name"),
                                   [i["key"] for i in v["configMap"].get("items") or []],
                                   optional=v["configMap"].get("optional", False))
            names = [c["name"] for c in containers(w)]
            if len(names) != len(set(names)):
                self.err(w, f"container names repeat: {names}")
            for c in containers(w):
                self.check_container(w, c, volumes, claim_names)

    def check_ref(self, doc, kind, name, keys, optional=False):
        pool = self.secrets if kind == "Secret" else self.configmaps
        target = pool.get(name)
        if target is None:
            if not optional and not (kind == "ConfigMap" and name in EXTERNAL_CONFIGMAPS):
                self.err(doc, f"{kind} {name!r} is not rendered" + (" nor in the example Secrets" if kind == "Secret" else ""))
            return None
        missing = [k for k in keys if k not in self.data_keys(target)]
        if missing:
            self.err(doc, f"{kind} {name!r} has no key(s) {missing}")
        return target

    def container_env(self, w, c):
        """The container's environment as far as it is known statically."""
        env = {}
        for src in c.get("envFrom") or []:
            if "configMapRef" in src:
                cm = self.check_ref(w, "ConfigMap", src["configMapRef"]["name"], [],
                                    src["configMapRef"].get("optional", False))
                if cm:
                    env.update({src.get("prefix", "") + k: v for k, v in (cm.get("data") or {}).items()})
            if "secretRef" in src:
                self.check_ref(w, "Secret", src["secretRef"]["name"], [], src["secretRef"].get("optional", False))
        for e in c.get("env") or []:
            env[e["name"]] = e.get("value", "<from valueFrom>")
        return env

    def check_container(self, w, c, volumes, claim_names):
        where = f"container {c['name']!r}"
        image = c.get("image", "")
        last = image.rsplit("/", 1)[-1]
        if "@" not in last and ":" not in last:
            self.err(w, f"{where}: image {image!r} has no tag (set one with `images:` in the overlay)")
        elif last.endswith(":latest"):
            self.err(w, f"{where}: image {image!r} uses :latest")
        ports = {}
        for p in c.get("ports") or []:
            if "name" in p:
                if len(p["name"]) > 15 or not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", p["name"]):
                    self.err(w, f"{where}: port name {p['name']!r} is not an IANA_SVC_NAME (<= 15 chars)")
                if p["name"] in ports:
                    self.err(w, f"{where}: port name {p['name']!r} twice")
                ports[p["name"]] = p["containerPort"]
        numbers = {p["containerPort"] for p in c.get("ports") or []}
        for probe_name in ("startupProbe", "livenessProbe", "readinessProbe"):
            probe = c.get(probe_name)
            if not probe:
                continue
            for handler in ("httpGet", "tcpSocket", "grpc"):
                if handler in probe:
                    port = probe[handler]["port"]
                    if isinstance(port, str) and port not in ports:
                        self.err(w, f"{where}: {probe_name} port {port!r} is not a named container port")
                    if isinstance(port, int) and port not in numbers:
                        self.err(w, f"{where}: {probe_name} port {port} is not a container port")
        env_names = [e["name"] for e in c.get("env") or []]
        dupes = {n for n in env_names if env_names.count(n) > 1}
        if dupes:
            self.err(w, f"{where}: env {sorted(dupes)} set twice")
        for e in c.get("env") or []:
            vf = e.get("valueFrom") or {}
            if "secretKeyRef" in vf:
                r = vf["secretKeyRef"]
                self.check_ref(w, "Secret", r["name"], [r["key"]], r.get("optional", False))
            if "configMapKeyRef" in vf:
                r = vf["configMapKeyRef"]
                self.check_ref(w, "ConfigMap", r["name"], [r["key"]], r.get("optional", False))
        mounts = {}
        for m in c.get("volumeMounts") or []:
            if m["name"] not in volumes and m["name"] not in claim_names:
                self.err(w, f"{where}: volumeMount {m['name']!r}: no such volume")
            mounts[m["mountPath"]] = m
        if c["name"].startswith("herald-"):
            self.check_herald_container(w, c, ports, mounts, volumes)

    # ---- Herald's own rules -------------------------------------------------

    def check_herald_container(self, w, c, ports, mounts, volumes):
        where = f"container {c['name']!r}"
        env = self.container_env(w, c)
        ps = pod_spec(w)
        admin = listen_port(env.get("HERALD_ADMIN_LISTEN"))
        if admin is None:
            self.err(w, f"{where}: HERALD_ADMIN_LISTEN is not set to host:port")
        elif ports.get("admin") != admin:
            self.err(w, f"{where}: HERALD_ADMIN_LISTEN port {admin} is not the container port named admin ({ports.get('admin')})")
        if "HERALD_LISTEN" in env and ports.get("http") != listen_port(env["HERALD_LISTEN"]):
            self.err(w, f"{where}: HERALD_LISTEN port is not the container port named http")
        if env.get("HERALD_AMQP_URL") != "<from valueFrom>":
            self.err(w, f"{where}: HERALD_AMQP_URL must come from a Secret (valueFrom.secretKeyRef)")
        for probe_name, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            get = (c.get(probe_name) or {}).get("httpGet") or {}
            if get.get("path") != path or get.get("port") != "admin":
                self.err(w, f"{where}: {probe_name} must be GET {path} on the admin port")
        for var in ("HERALD_USERS_FILE", "HERALD_ACCOUNTS_FILE"):
            if var not in env:
                continue
            path = env[var]
            directory, _, filename = path.rpartition("/")
            mount = mounts.get(directory)
            if mount is None:
                self.err(w, f"{where}: {var}={path}: nothing is mounted at {directory}")
                continue
            if not mount.get("readOnly"):
                self.err(w, f"{where}: the mount at {directory} must be readOnly")
            vol = volumes.get(mount["name"], {})
            if "secret" not in vol:
                self.err(w, f"{where}: {var} must come from a Secret volume")
                continue
            items = vol["secret"].get("items")
            paths = {i["path"]: i["key"] for i in items} if items else None
            secret = self.secrets.get(vol["secret"]["secretName"])
            key = paths.get(filename) if paths is not None else filename
            if key is None:
                self.err(w, f"{where}: {var}: the Secret volume has no item with path {filename!r}")
            elif secret is not None and key not in self.data_keys(secret):
                self.err(w, f"{where}: {var}: Secret {vol['secret']['secretName']!r} has no key {key!r}")
        if "HERALD_DRAIN_TIMEOUT" in env:
            try:
                drain = parse_duration(env["HERALD_DRAIN_TIMEOUT"])
            except ValueError:
                self.err(w, f"{where}: HERALD_DRAIN_TIMEOUT {env['HERALD_DRAIN_TIMEOUT']!r} is not a duration")
            else:
                grace = ps.get("terminationGracePeriodSeconds", 30)
                if grace < drain + 10:
                    self.err(w, f"terminationGracePeriodSeconds {grace} must exceed HERALD_DRAIN_TIMEOUT ({drain:g}s) by 10s or more")
        for var in ("HERALD_RETRY_DELAYS",):
            if var in env:
                try:
                    [parse_duration(p.strip()) for p in env[var].split(",") if p.strip()]
                except ValueError:
                    self.err(w, f"{where}: {var} {env[var]!r} is not a list of durations")
        for var in ("HERALD_PREFETCH", "HERALD_MAX_BODY_BYTES", "HERALD_AUTH_CACHE_SECONDS"):
            if var in env and not str(env[var]).isdigit():
                self.err(w, f"{where}: {var} {env[var]!r} is not a whole number")
        # restricted Pod Security Standard, and a little more.
        psc = ps.get("securityContext") or {}
        csc = c.get("securityContext") or {}

        def eff(key):
            return csc.get(key, psc.get(key))
        if eff("runAsNonRoot") is not True:
            self.err(w, f"{where}: runAsNonRoot must be true")
        if eff("runAsUser") != 65532:
            self.err(w, f"{where}: runAsUser must be 65532 (distroless nonroot)")
        if csc.get("allowPrivilegeEscalation") is not False:
            self.err(w, f"{where}: allowPrivilegeEscalation must be false")
        if csc.get("readOnlyRootFilesystem") is not True:
            self.err(w, f"{where}: readOnlyRootFilesystem must be true")
        if "ALL" not in ((csc.get("capabilities") or {}).get("drop") or []):
            self.err(w, f"{where}: capabilities.drop must contain ALL")
        if (eff("seccompProfile") or {}).get("type") != "RuntimeDefault":
            self.err(w, f"{where}: seccompProfile must be RuntimeDefault")
        res = c.get("resources") or {}
        for part in ("requests", "limits"):
            for r in ("cpu", "memory"):
                if r not in (res.get(part) or {}):
                    self.err(w, f"{where}: resources.{part}.{r} is not set")

    # ---- things that select pods or objects -----------------------------------

    def pods_selected(self, selector, namespace):
        return [w for w in self.workloads()
                if w["metadata"].get("namespace") == namespace and selector_matches(selector, pod_labels(w))]

    def check_selectors(self):
        for svc in self.by_kind.get("Service", []):
            sel = svc["spec"].get("selector")
            if not sel:
                continue
            targets = self.pods_selected({"matchLabels": sel}, svc["metadata"].get("namespace"))
            if not targets:
                self.err(svc, f"selector {sel} selects no pods")
            for p in svc["spec"].get("ports") or []:
                tp = p.get("targetPort", p["port"])
                for w in targets:
                    cports = [cp for c in containers(w, init=False) for cp in c.get("ports") or []]
                    if isinstance(tp, str) and tp not in {cp.get("name") for cp in cports}:
                        self.err(svc, f"port {p.get('name')!r}: targetPort {tp!r} is not a named port of {ident(w)}")
                    if isinstance(tp, int) and tp not in {cp["containerPort"] for cp in cports}:
                        self.err(svc, f"port {p.get('name')!r}: targetPort {tp} is not a container port of {ident(w)}")
        for kind in ("PodDisruptionBudget",):
            for d in self.by_kind.get(kind, []):
                if not self.pods_selected(d["spec"].get("selector"), d["metadata"].get("namespace")):
                    self.err(d, "selector selects no pods")
                if d["spec"].get("minAvailable") not in (None, 0) and "maxUnavailable" not in d["spec"]:
                    for w in self.pods_selected(d["spec"]["selector"], d["metadata"].get("namespace")):
                        if w["spec"].get("replicas", 1) <= d["spec"]["minAvailable"]:
                            self.err(d, f"minAvailable {d['spec']['minAvailable']} blocks every drain of {ident(w)}")
        for np in self.by_kind.get("NetworkPolicy", []):
            if not self.pods_selected(np["spec"]["podSelector"], np["metadata"].get("namespace")):
                self.err(np, "podSelector selects no pods")
            for rule in np["spec"].get("ingress") or []:
                for port in rule.get("ports") or []:
                    number = port.get("port")
                    for w in self.pods_selected(np["spec"]["podSelector"], np["metadata"].get("namespace")):
                        cports = [cp for c in containers(w, init=False) for cp in c.get("ports") or []]
                        known = {cp["containerPort"] for cp in cports} | {cp.get("name") for cp in cports}
                        if number is not None and number not in known:
                            self.err(np, f"ingress port {number} is not a port of {ident(w)}")
        scaled = {}
        for hpa in self.by_kind.get("HorizontalPodAutoscaler", []):
            ref = hpa["spec"]["scaleTargetRef"]
            target = self.named(ref["kind"], ref["name"])
            if target is None:
                self.err(hpa, f"scaleTargetRef {ref['kind']}/{ref['name']} is not rendered")
            scaled.setdefault((ref["kind"], ref["name"]), []).append(ident(hpa))
            lo, hi = hpa["spec"].get("minReplicas", 1), hpa["spec"]["maxReplicas"]
            if lo > hi:
                self.err(hpa, f"minReplicas {lo} > maxReplicas {hi}")
            if target is not None:
                for c in containers(target, init=False):
                    for m in hpa["spec"].get("metrics") or []:
                        r = (m.get("resource") or {}).get("name")
                        if m.get("type") == "Resource" and r not in ((c.get("resources") or {}).get("requests") or {}):
                            self.err(hpa, f"scales on {r} but {ident(target)} container {c['name']!r} requests no {r}")
        auths = {d["metadata"]["name"]: d for d in self.by_kind.get("TriggerAuthentication", [])}
        for ta in auths.values():
            for ref in ta["spec"].get("secretTargetRef") or []:
                self.check_ref(ta, "Secret", ref["name"], [ref["key"]])
        for so in self.by_kind.get("ScaledObject", []):
            ref = so["spec"]["scaleTargetRef"]
            kind = ref.get("kind", "Deployment")
            target = self.named(kind, ref["name"])
            if target is None:
                self.err(so, f"scaleTargetRef {kind}/{ref['name']} is not rendered")
            elif "replicas" in target["spec"]:
                self.err(so, f"{ident(target)} still sets spec.replicas, which every apply would reset under KEDA")
            scaled.setdefault((kind, ref["name"]), []).append(ident(so))
            for t in so["spec"].get("triggers") or []:
                a = (t.get("authenticationRef") or {}).get("name")
                if a and (t["authenticationRef"].get("kind", "TriggerAuthentication") == "TriggerAuthentication"
                          and a not in auths):
                    self.err(so, f"authenticationRef {a!r}: no such TriggerAuthentication")
        for (kind, name), owners in scaled.items():
            if len(owners) > 1:
                self.errors.append(f"{self.name}: {kind}/{name} is scaled by several autoscalers: {owners}")
        for sm in self.by_kind.get("ServiceMonitor", []):
            ns = sm["metadata"].get("namespace")
            services = [s for s in self.by_kind.get("Service", [])
                        if s["metadata"].get("namespace") == ns
                        and selector_matches(sm["spec"]["selector"], s["metadata"].get("labels") or {})]
            if not services:
                self.err(sm, "selector selects no Service")
            for ep in sm["spec"]["endpoints"]:
                for s in services:
                    if "port" in ep and ep["port"] not in {p.get("name") for p in s["spec"]["ports"]}:
                        self.err(sm, f"endpoint port {ep['port']!r} is not a port name of {ident(s)}")

    def run(self, versions):
        self.check_schemas(versions)
        self.check_metadata()
        self.check_workloads()
        self.check_selectors()
        return self.errors


# --------------------------------------------------------------------------

def load(path):
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    bad = [i for i, d in enumerate(docs) if not isinstance(d, dict) or not {"apiVersion", "kind", "metadata"} <= set(d)
           or not (d.get("metadata") or {}).get("name")]
    if bad:
        raise SystemExit(f"{path}: document(s) {bad} lack apiVersion, kind or metadata.name")
    return docs


def external_secrets(path, versions, errors):
    secrets = {}
    for d in load(path):
        if d["kind"] != "Secret":
            errors.append(f"{path}: {ident(d)}: only Secrets belong in the example file")
            continue
        if (d.get("metadata") or {}).get("namespace"):
            errors.append(f"{path}: {ident(d)}: no namespace in the example, `kubectl -n` chooses it")
        for v in versions:
            try:
                kubernetes_validate.validate(d, v, strict=True)
            except kubernetes_validate.ValidationError as e:
                errors.append(f"{path}: {ident(d)}: Kubernetes {v} schema: {'.'.join(map(str, e.path))}: {e.message}")
        for key, text in (d.get("stringData") or {}).items():
            if key == "users.toml":
                errors.extend(check_users(text, f"{path}: {ident(d)}: {key}"))
            if key == "accounts.toml":
                errors.extend(check_accounts(text, f"{path}: {ident(d)}: {key}"))
            if key == "url" and not re.match(r"^amqps?://", text):
                errors.append(f"{path}: {ident(d)}: url must be amqp:// or amqps://")
        secrets[d["metadata"]["name"]] = d
    return secrets


def unreferenced_files(k8s_dir):
    """YAML files under k8s_dir that no kustomization lists (forgotten
    manifests), except the examples, which must stay out of every one."""
    import os
    listed, kustomizations = set(), []
    for dirpath, _, files in os.walk(k8s_dir):
        if "kustomization.yaml" in files:
            kustomizations.append(os.path.join(dirpath, "kustomization.yaml"))
    for path in kustomizations:
        with open(path) as f:
            k = yaml.safe_load(f) or {}
        here = os.path.dirname(path)
        refs = list(k.get("resources") or []) + list(k.get("components") or [])
        refs += [p["path"] for p in k.get("patches") or [] if "path" in p]
        refs += list(k.get("patchesStrategicMerge") or [])
        for ref in refs:
            listed.add(os.path.normpath(os.path.join(here, ref)))
    errors = []
    for dirpath, _, files in os.walk(k8s_dir):
        for name in files:
            path = os.path.normpath(os.path.join(dirpath, name))
            if not name.endswith((".yaml", ".yml")) or name == "kustomization.yaml":
                continue
            in_examples = os.sep + "examples" + os.sep in os.sep + os.path.relpath(path, k8s_dir)
            if in_examples and path in listed:
                errors.append(f"{path}: an example must not be listed in a kustomization")
            elif not in_examples and path not in listed:
                errors.append(f"{path}: no kustomization lists it")
    return errors


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k8s-version", action="append", required=True)
    ap.add_argument("--external-secrets", required=True)
    ap.add_argument("--k8s-dir", help="check that every manifest under it is used")
    ap.add_argument("rendered", nargs="+", metavar="NAME=FILE")
    args = ap.parse_args()
    errors = unreferenced_files(args.k8s_dir) if args.k8s_dir else []
    ext = external_secrets(args.external_secrets, args.k8s_version, errors)
    print(f"  {args.external_secrets}: {len(ext)} example Secrets")
    for item in args.rendered:
        name, _, path = item.partition("=")
        docs = load(path)
        overlay_errors = Overlay(name, docs, copy.deepcopy(ext)).run(args.k8s_version)
        kinds = {}
        for d in docs:
            kinds[d["kind"]] = kinds.get(d["kind"], 0) + 1
        summary = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        print(f"  {name}: {len(docs)} objects ({summary}): "
              f"{'ok' if not overlay_errors else str(len(overlay_errors)) + ' problem(s)'}")
        errors.extend(overlay_errors)
    for e in errors:
        print(f"ERROR {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
