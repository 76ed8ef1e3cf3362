#!/usr/bin/env python3
"""Offline checks of deploy/compose/compose.yaml.

    check_compose.py --schema compose_spec.json deploy/compose/compose.yaml

1. The file against the Compose specification's JSON schema (unknown keys
   are errors). The schema is the one docker-compose 1.29.2 ships; fields
   the specification gained later (top-level `name`) are taken out first.
2. What the schema cannot see: build contexts and Dockerfiles exist, bind
   mounts exist, named volumes are declared, depends_on targets exist and
   have a health check where one is awaited, host ports are unique, and
   Herald's wiring: the AMQP URL names the broker service with its
   credentials, the users and accounts files are mounted and valid, each
   account's server is a service of the stack with its password, and the
   trust anchors (SSL_CERT_FILE, SSL_CERT_DIR) lie on a mounted volume, set
   for the relay whenever it talks TLS to an XMPP server of the stack (whose
   certificate comes from a private CA).
"""

import argparse
import json
import os
import re
import sys
import tomllib
from urllib.parse import unquote, urlsplit

import dockerfile
import jsonschema
import yaml

from herald_files import check_accounts, check_users

NEWER_TOP_LEVEL = {"name"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--schema", required=True)
    ap.add_argument("compose")
    args = ap.parse_args()
    errors = []
    path = args.compose
    base = os.path.dirname(os.path.abspath(path))
    with open(path) as f:
        doc = yaml.safe_load(f)

    # -- 1. schema ----------------------------------------------------------
    with open(args.schema) as f:
        schema = json.load(f)
    checked = {k: v for k, v in doc.items() if k not in NEWER_TOP_LEVEL}
    for key in NEWER_TOP_LEVEL & set(doc):
        if not isinstance(doc[key], str) or not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", doc[key]):
            errors.append(f"top-level {key!r} must be a lower-case project name")
    # The file says draft 2019-09 (with a trailing "#" that jsonschema does not
    # recognise); say so explicitly.
    for e in sorted(jsonschema.Draft201909Validator(schema).iter_errors(checked), key=lambda e: list(e.absolute_path)):
        where = ".".join(str(p) for p in e.absolute_path) or "(top)"
        message = re.sub(r"^(.*) does not match any of the regexes: '\^x-'$",
                         r"unknown key \1 (not in the Compose specification, nor an x- extension)", e.message)
        errors.append(f"schema: {where}: {message}")

    services = doc.get("services") or {}
    volumes = doc.get("volumes") or {}

    def err(service, message):
        errors.append(f"service {service!r}: {message}")

    def env_of(svc):
        env = svc.get("environment") or {}
        if isinstance(env, list):
            env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
        return {k: "" if v is None else str(v) for k, v in env.items()}

    def mounts_of(svc):
        out = []
        for v in svc.get("volumes") or []:
            if isinstance(v, str):
                parts = v.split(":")
                source, target = (parts[0], parts[1]) if len(parts) > 1 else (None, parts[0])
                out.append((source, target, "ro" in parts[2:]))
            else:
                out.append((v.get("source"), v["target"], bool(v.get("read_only"))))
        return out

    def mount_of(svc, container_path):
        """(source, target) of the mount that holds container_path, or None."""
        for source, target, _ in mounts_of(svc):
            t = target.rstrip("/")
            if container_path == t or container_path.startswith(t + "/"):
                return source, target
        return None

    def host_file(svc, container_path):
        """(host path, read-only) of a file bind-mounted at container_path."""
        for source, target, ro in mounts_of(svc):
            if target == container_path and source and source.startswith((".", "/")):
                return os.path.normpath(os.path.join(base, source)), ro
        return None, False

    def dockerfile_of(svc):
        build = svc.get("build")
        if build is None:
            return None
        if isinstance(build, str):
            build = {"context": build}
        context = os.path.normpath(os.path.join(base, build.get("context", ".")))
        return context, os.path.join(context, build.get("dockerfile", "Dockerfile"))

    def has_healthcheck(svc):
        hc = svc.get("healthcheck")
        if hc is not None:
            return not hc.get("disable", False)
        df = dockerfile_of(svc)
        if df and os.path.isfile(df[1]):
            return any(c.cmd == "HEALTHCHECK" and c.value[:1] != ("NONE",) for c in dockerfile.parse_file(df[1]))
        return False

    # -- 2. structure ---------------------------------------------------------
    host_ports = {}
    for name, svc in services.items():
        df = dockerfile_of(svc)
        if df:
            context, dockerfile_path = df
            if not os.path.isdir(context):
                err(name, f"build context {context} does not exist")
            elif not os.path.isfile(dockerfile_path):
                err(name, f"Dockerfile {dockerfile_path} does not exist")
        elif "image" not in svc:
            err(name, "neither image nor build")
        for source, target, _ in mounts_of(svc):
            if source is None:
                continue
            if source.startswith((".", "/")):
                if not os.path.exists(os.path.join(base, source)):
                    err(name, f"bind mount source {source} does not exist")
            elif source not in volumes:
                err(name, f"volume {source!r} is not declared under top-level volumes")
        deps = svc.get("depends_on") or {}
        if isinstance(deps, list):
            deps = {d: {"condition": "service_started"} for d in deps}
        for dep, cond in deps.items():
            if dep not in services:
                err(name, f"depends_on {dep!r}: no such service")
            elif cond.get("condition") == "service_healthy" and not has_healthcheck(services[dep]):
                err(name, f"waits for {dep!r} to be healthy, but {dep!r} has no health check")
        for p in svc.get("ports") or []:
            spec = str(p) if not isinstance(p, dict) else f"{p.get('host_ip', '')}:{p.get('published')}:{p['target']}"
            parts = spec.split(":")
            if len(parts) >= 2:
                published = parts[-2]
                if published in host_ports:
                    err(name, f"host port {published} is also published by {host_ports[published]!r}")
                host_ports[published] = name

    # -- 3. Herald's wiring ---------------------------------------------------
    broker = next((n for n, s in services.items() if str(s.get("image", "")).startswith("rabbitmq:")), None)
    herald = {n: s for n, s in services.items() if str(s.get("image", "")).startswith("ghcr.io/herald-xmpp/")}
    if broker is None:
        errors.append("no rabbitmq service")
    if not any("herald-ingress" in s["image"] for s in herald.values()):
        errors.append("no herald-ingress service")
    if not any("herald-relay" in s["image"] for s in herald.values()):
        errors.append("no herald-relay service")
    hostnames = set(services) | {s["hostname"] for s in services.values() if "hostname" in s}
    for name, svc in herald.items():
        env = env_of(svc)
        url = urlsplit(env.get("HERALD_AMQP_URL", ""))
        if url.scheme not in ("amqp", "amqps"):
            err(name, "HERALD_AMQP_URL is not an amqp:// URL")
        elif broker:
            benv = env_of(services[broker])
            if url.hostname not in (broker, services[broker].get("hostname")):
                err(name, f"HERALD_AMQP_URL names host {url.hostname!r}, the broker service is {broker!r}")
            if (unquote(url.username or ""), unquote(url.password or "")) != (
                    benv.get("RABBITMQ_DEFAULT_USER", "guest"), benv.get("RABBITMQ_DEFAULT_PASS", "guest")):
                err(name, "HERALD_AMQP_URL credentials are not the broker's RABBITMQ_DEFAULT_USER/PASS")
            deps = svc.get("depends_on") or {}
            if broker not in deps:
                err(name, f"does not depend on {broker!r}")
        if not svc.get("read_only"):
            err(name, "read_only should be true (the image needs no writable root)")
        # Trust anchors for XMPP TLS and amqps:// (rustls-native-certs in
        # tokio-xmpp and lapin): when SSL_CERT_FILE or SSL_CERT_DIR is set,
        # only those are read, instead of the system store, so what they name
        # must be in the container: on a mounted volume, or the image's own
        # bundle under /etc/ssl/certs.
        trust = [("SSL_CERT_FILE", env["SSL_CERT_FILE"])] if "SSL_CERT_FILE" in env else []
        trust += [("SSL_CERT_DIR", d) for d in env.get("SSL_CERT_DIR", "").split(":") if d]
        for var, tpath in trust:
            mount = mount_of(svc, tpath)
            if not tpath.startswith("/"):
                err(name, f"{var}={tpath} is not an absolute path")
            elif tpath.startswith("/etc/ssl/certs/"):
                continue
            elif mount is None:
                err(name, f"{var}={tpath} is on no mounted volume")
            elif mount[0] and mount[0].startswith((".", "/")):
                source = os.path.join(base, mount[0], os.path.relpath(tpath, mount[1]))
                if os.path.exists(os.path.join(base, mount[0])) and not os.path.exists(source):
                    err(name, f"{var}={tpath}: {os.path.normpath(source)} does not exist on the host")
        for var, check in (("HERALD_USERS_FILE", check_users), ("HERALD_ACCOUNTS_FILE", check_accounts)):
            if var not in env:
                continue
            host, ro = host_file(svc, env[var])
            if host is None:
                err(name, f"{var}={env[var]} is not bind-mounted from a file")
                continue
            if not os.path.isfile(host):
                continue  # reported above as a missing bind mount source
            if not ro:
                err(name, f"{env[var]} should be mounted read-only (:ro)")
            with open(host) as f:
                text = f.read()
            problems = check(text, os.path.relpath(host))
            errors.extend(problems)
            if var == "HERALD_ACCOUNTS_FILE" and not problems:
                for account in tomllib.loads(text)["accounts"]:
                    server = account.get("server")
                    user = account["jid"].split("@", 1)[0]
                    if server:
                        host_part = server.rsplit(":", 1)[0]
                        if host_part not in hostnames:
                            err(name, f"account {account['jid']}: server {server!r} is not a service of the stack")
                        target = next((s for n, s in services.items()
                                       if host_part in (n, s.get("hostname"))), None)
                        if target is not None:
                            expected = env_of(target).get(f"{user.upper()}_PASSWORD")
                            if expected is not None and expected != account["password"]:
                                err(name, f"account {account['jid']}: password differs from "
                                          f"{user.upper()}_PASSWORD of the XMPP server's service")
                            if target is not None and host_part not in (svc.get("depends_on") or {}):
                                err(name, f"does not depend on the XMPP server {host_part!r}")
                            # A server of the stack has no publicly trusted
                            # certificate; its CA must be the relay's trust
                            # anchor (there is no per-account CA setting).
                            if (target is not None and account.get("tls", "required") != "none"
                                    and "SSL_CERT_FILE" not in env and "SSL_CERT_DIR" not in env):
                                err(name, f"account {account['jid']}: TLS to {server!r}, a service of the "
                                          f"stack, needs its CA in SSL_CERT_FILE or SSL_CERT_DIR")
            if var == "HERALD_ACCOUNTS_FILE":
                grace = svc.get("stop_grace_period", "10s")
                m = re.fullmatch(r"(\d+)s", str(grace))
                drain = 20
                if not m or int(m.group(1)) <= drain:
                    err(name, f"stop_grace_period {grace} must exceed the relay's drain timeout ({drain}s)")

    for e in errors:
        print(f"ERROR {path}: {e}", file=sys.stderr)
    if not errors:
        print(f"  {path}: {len(services)} services ({', '.join(services)}): ok")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
