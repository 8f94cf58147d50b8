#!/usr/bin/env bash
# Pin every base image of images/bases.env to the digest its tag points at now.
# Needs docker (buildx) and access to the registries; rewrites the file in place.
set -euo pipefail
file="$(dirname "$0")/bases.env"
while IFS='=' read -r key image; do
  [[ "$key" == *_IMAGE ]] || continue
  digest="$(docker buildx imagetools inspect "$image" --format '{{json .Manifest.Digest}}' | tr -d '"')"
  [[ "$digest" == sha256:* ]] || { echo "error: no digest for $image" >&2; exit 1; }
  sed -i "s|^${key%_IMAGE}_DIGEST=.*|${key%_IMAGE}_DIGEST=${digest}|" "$file"
  echo "${image} -> ${digest}"
done < <(grep -E '^[A-Z_]+_IMAGE=' "$file")
