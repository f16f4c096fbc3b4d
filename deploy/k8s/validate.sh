#!/usr/bin/env bash
# Renders a kustomization (default: this base) and validates every object it makes with
# kubeconform, offline and strictly (an unknown field or a wrong type fails):
#   - Kubernetes' own kinds against the JSON schemas of the kubernetes-validate package
#     (pinned in pyproject.toml's dev extra, installed in .venv);
#   - KEDA's kinds against schemas/ (made from KEDA's CRDs by schemas/make_schemas.py).
# kustomize and kubeconform are built once per machine with the local Go, into a cache shared
# by every checkout (QTASKS_TOOLS, default ~/.cache/qtasks-tools), as the Kafka jars are.
#
#   deploy/k8s/validate.sh [KUSTOMIZATION_DIR]
set -euo pipefail

KUSTOMIZE_VERSION=v5.8.2    # v5.8.3 needs Go 1.27
KUBECONFORM_VERSION=v0.7.0
KUBERNETES_VERSION=1.37.0   # a schema set of the kubernetes-validate package

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
target=${1:-$here}
tools=${QTASKS_TOOLS:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/qtasks-tools}
python=$root/.venv/bin/python

export GOBIN=$tools/bin
# Go's own module and build caches; never a downloaded toolchain.
export GOTOOLCHAIN=local

# go install PACKAGE at VERSION into $GOBIN, unless that version is there already.
build_tool() {
    local name=$1 package=$2 version=$3
    if [[ -x $GOBIN/$name && $(cat "$GOBIN/$name.version" 2>/dev/null) == "$version" ]]; then
        return
    fi
    command -v go >/dev/null || { echo "validate.sh: Go is needed to build $name" >&2; exit 1; }
    echo "validate.sh: building $name $version into $GOBIN" >&2
    go install "$package@$version"
    echo "$version" >"$GOBIN/$name.version"
}
build_tool kustomize sigs.k8s.io/kustomize/kustomize/v5 "$KUSTOMIZE_VERSION"
build_tool kubeconform github.com/yannh/kubeconform/cmd/kubeconform "$KUBECONFORM_VERSION"

# The package's schemas refer to their shared definitions by an absolute URL
# (https://kubernetes.io/api/_definitions.json), which kubeconform would fetch. A copy with
# relative references resolves from the disk alone; made once per package version.
package=$("$python" -c 'import importlib.metadata as m; print(m.version("kubernetes-validate"))' 2>/dev/null) || {
    echo "validate.sh: kubernetes-validate is not installed in .venv (make install)" >&2
    exit 1
}
schemas=$tools/kubernetes-json-schema/$package
strict_dir=v$KUBERNETES_VERSION-local-strict
if [[ ! -d $schemas/$strict_dir ]]; then
    mkdir -p "$schemas"
    work=$(mktemp -d "$schemas/.tmp.XXXXXX")
    "$python" - "$strict_dir" "$work" <<'EOF'
import json, pathlib, sys
import kubernetes_validate

name, out = sys.argv[1], pathlib.Path(sys.argv[2])
src = pathlib.Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / name
if not src.is_dir():
    sys.exit(f"validate.sh: kubernetes-validate has no {name}")
for path in src.glob("*.json"):
    schema = json.loads(path.read_text())
    schema.pop("$id", None)
    text = json.dumps(schema).replace('"/api/_definitions.json#', '"_definitions.json#')
    (out / path.name).write_text(text)
EOF
    mv -T "$work" "$schemas/$strict_dir" 2>/dev/null || rm -rf "$work"  # a parallel run made it first
fi

"$GOBIN/kustomize" build "$target" |
    "$GOBIN/kubeconform" -strict -summary -verbose \
        -kubernetes-version "$KUBERNETES_VERSION" \
        -schema-location "$schemas/{{ .NormalizedKubernetesVersion }}-local{{ .StrictSuffix }}/{{ .ResourceKind }}{{ .KindSuffix }}.json" \
        -schema-location "$here/schemas/{{ .Group }}/{{ .ResourceKind }}_{{ .ResourceAPIVersion }}.json" \
        -
