#!/usr/bin/env python3
"""Offline lint of the Dockerfiles (no Docker engine needed).

    check_dockerfiles.py REPO_ROOT

Parses every Dockerfile under deploy/ with BuildKit's own parser (the PyPI
package `dockerfile`), then checks: known instructions, stage references,
COPY sources inside the build context, exec-form ENTRYPOINT/CMD/HEALTHCHECK;
and for Herald's two images: the builder and runtime bases, `--locked
--release` builds of the right package, a non-root numeric USER, the
healthcheck subcommand, EXPOSE matching the listen addresses, and a root
.dockerignore that keeps target/ and .git out of the context.
"""

import glob
import os
import re
import sys

import dockerfile

INSTRUCTIONS = {"ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK",
                "LABEL", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR"}
HERALD = {
    # Dockerfile name: (package/binary, ports it must EXPOSE)
    "ingress.Dockerfile": ("herald-ingress", {"8080", "9090"}),
    "relay.Dockerfile": ("herald-relay", {"9091"}),
}
BUILDER_IMAGE = "rust:1.95-bookworm"
RUNTIME_IMAGE = "gcr.io/distroless/cc-debian12:nonroot"


def resolve(text, args):
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), text)


def check(path, context, errors):
    def err(line, message):
        errors.append(f"{os.path.relpath(path)}:{line}: {message}")

    try:
        commands = dockerfile.parse_file(path)
    except dockerfile.GoParseError as e:
        err(0, f"does not parse: {e}")
        return
    args, stages, stage_bases, env = {}, [], [], {}
    final = {}
    for c in commands:
        if c.cmd not in INSTRUCTIONS:
            err(c.start_line, f"unknown instruction {c.cmd}")
            continue
        if c.cmd == "ARG" and not stages:
            for v in c.value:
                name, _, default = v.partition("=")
                args[name] = default
        if c.cmd == "FROM":
            values = list(c.value)
            image = resolve(values[0], args)
            name = values[2] if len(values) >= 3 and values[1].upper() == "AS" else None
            if image not in stages and ":" not in image.rsplit("/", 1)[-1] and "@" not in image:
                err(c.start_line, f"base image {image!r} has no tag")
            stages.append(name or str(len(stages)))
            stage_bases.append(image)
            final = {"image": image, "user": None, "entrypoint": None, "healthcheck": None, "expose": set()}
            env = {}
        if c.cmd in ("COPY", "ADD"):
            from_flag = next((f.split("=", 1)[1] for f in c.flags if f.startswith("--from=")), None)
            if from_flag is not None:
                if from_flag not in stages[:-1] and not re.search(r"[:/]", from_flag):
                    err(c.start_line, f"COPY --from={from_flag}: no earlier stage of that name")
            else:
                for src in c.value[:-1]:
                    if not glob.glob(os.path.join(context, src)):
                        err(c.start_line, f"{c.cmd} source {src!r} is not in the build context {os.path.relpath(context)}")
        if c.cmd in ("ENTRYPOINT", "CMD") and not c.json:
            err(c.start_line, f"{c.cmd} must use the exec (JSON) form: the runtime image may have no shell")
        if c.cmd == "HEALTHCHECK":
            if c.value and c.value[0] == "CMD" and not c.json:
                err(c.start_line, "HEALTHCHECK CMD must use the exec (JSON) form")
            final["healthcheck"] = c.value
        if c.cmd == "USER":
            final["user"] = c.value[0]
        if c.cmd == "ENTRYPOINT":
            final["entrypoint"] = c.value
        if c.cmd == "EXPOSE":
            final["expose"] |= {v.split("/")[0] for v in c.value}
        if c.cmd == "ENV":
            env.update(dict(zip(c.value[::2], c.value[1::2])))
    if not stages:
        err(0, "no FROM")
        return

    name = os.path.basename(path)
    if name not in HERALD:
        return
    binary, ports = HERALD[name]
    if stage_bases[0] != BUILDER_IMAGE:
        err(0, f"the first stage should build on {BUILDER_IMAGE}, not {stage_bases[0]}")
    if final["image"] != RUNTIME_IMAGE:
        err(0, f"the runtime stage should be {RUNTIME_IMAGE}, not {final['image']}")
    runs = [c for c in commands if c.cmd == "RUN"]
    cook = [c for c in runs if "cargo chef cook" in c.value[0]]
    build = [c for c in runs if re.search(r"\bcargo build\b", c.value[0])]
    if not cook:
        err(0, "no `cargo chef cook` layer: dependencies would rebuild on every source change")
    if not build:
        err(0, "no `cargo build`")
    for c in cook + build:
        line = c.value[0]
        for flag in ("--locked", "--release", f"-p {binary}"):
            if flag not in line:
                err(c.start_line, f"{flag!r} missing")
    user = final["user"] or ""
    uid = user.split(":")[0]
    if not uid.isdigit() or uid == "0":
        err(0, f"the runtime USER must be a numeric non-root uid (Kubernetes runAsNonRoot), not {user!r}")
    if final["entrypoint"] != (f"/usr/local/bin/{binary}",):
        err(0, f"ENTRYPOINT should be [\"/usr/local/bin/{binary}\"]")
    if final["healthcheck"] != ("CMD", f"/usr/local/bin/{binary}", "healthcheck"):
        err(0, f"HEALTHCHECK should run [\"/usr/local/bin/{binary}\", \"healthcheck\"]")
    if final["expose"] != ports:
        err(0, f"EXPOSE {sorted(final['expose'])}, expected {sorted(ports)}")
    for var in ("HERALD_LISTEN", "HERALD_ADMIN_LISTEN"):
        if var in env and env[var].rsplit(":", 1)[-1] not in final["expose"]:
            err(0, f"{var}={env[var]} is not EXPOSEd")
    if "HERALD_ADMIN_LISTEN" not in env:
        err(0, "HERALD_ADMIN_LISTEN is not set (the healthcheck subcommand reads it)")


def main():
    root = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else ".")
    errors = []
    paths = sorted(glob.glob(os.path.join(root, "deploy", "**", "*Dockerfile"), recursive=True))
    for path in paths:
        # Herald's images build from the repository root; others from their folder.
        context = root if os.path.basename(path) in HERALD else os.path.dirname(path)
        check(path, context, errors)
    for name in HERALD:
        if not any(os.path.basename(p) == name for p in paths):
            errors.append(f"deploy/docker/{name} is missing")
    ignore = os.path.join(root, ".dockerignore")
    if not os.path.isfile(ignore):
        errors.append(".dockerignore is missing at the repository root")
    else:
        with open(ignore) as f:
            entries = {line.strip().rstrip("/") for line in f if line.strip() and not line.startswith("#")}
        for needed in ("target", ".git"):
            if needed not in entries:
                errors.append(f".dockerignore does not exclude {needed}/")
        for kept in ("Cargo.toml", "Cargo.lock", "shared", "ingress", "relay", "tests"):
            if kept in entries:
                errors.append(f".dockerignore excludes {kept}, which the build needs")
    for e in errors:
        print(f"ERROR {e}", file=sys.stderr)
    if not errors:
        print(f"  {len(paths)} Dockerfiles ({', '.join(os.path.relpath(p, root) for p in paths)}) and .dockerignore: ok")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
