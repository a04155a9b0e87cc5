#!/usr/bin/env bash
# System tools the tests use to make real audio (espeak-ng, sox). Installed with apt where
# available and missing; elsewhere the user installs them (brew install espeak-ng sox).
set -euo pipefail
need=()
command -v espeak-ng >/dev/null 2>&1 || need+=(espeak-ng)
command -v sox >/dev/null 2>&1 || need+=(sox)
[ ${#need[@]} -eq 0 ] && exit 0
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing test tools: ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null \
        || { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null; }
else
    echo "missing test tools: ${need[*]} (install them with your package manager)" >&2
    exit 1
fi
