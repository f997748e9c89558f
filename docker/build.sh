#!/usr/bin/env bash
# Build and tag one image per pqflow stage: <registry>/pqflow-<stage>:<version>.
#   docker/build.sh                       # all eight, registry $PQFLOW_REGISTRY or ghcr.io/pqflow
#   docker/build.sh --push calibrate evaluate
#   REGISTRY=my.registry/ml VERSION=dev docker/build.sh
# The tags are the ones `pqflow compile` writes into the pipeline (same registry/version defaults).
set -euo pipefail
cd "$(dirname "$0")/.."
REGISTRY="${REGISTRY:-${PQFLOW_REGISTRY:-ghcr.io/pqflow}}"
VERSION="${VERSION:-$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)}"
DOCKER="${DOCKER:-docker}"
PUSH=0
STAGES=()
for a in "$@"; do
  case "$a" in
    --push) PUSH=1 ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    *) STAGES+=("$a") ;;
  esac
done
[ ${#STAGES[@]} -eq 0 ] && STAGES=(calibrate importance prune bit-search quantize finetune export evaluate)
export DOCKER_BUILDKIT=1  # per-Dockerfile .dockerignore
for s in "${STAGES[@]}"; do
  f="docker/$s.Dockerfile"
  [ -f "$f" ] || { echo "no $f (stages: calibrate importance prune bit-search quantize finetune export evaluate)" >&2; exit 2; }
  tag="$REGISTRY/pqflow-$s:$VERSION"
  echo ">> $tag"
  "$DOCKER" build -f "$f" -t "$tag" --label "org.opencontainers.image.version=$VERSION" \
    --label "io.pqflow.stage=$s" .
  [ "$PUSH" = 1 ] && "$DOCKER" push "$tag"
done
echo "built: ${STAGES[*]} as $REGISTRY/pqflow-<stage>:$VERSION"
