#!/usr/bin/env bash
# Debian packages the tests need beyond Python: docker-compose (Debian's 1.29, only to validate
# docker/docker-compose.yml with `docker-compose config -q`; no Docker engine is needed) and
# Chromium (headless, for the browser check of the Dagster UI).
# Idempotent: installs only what is missing and runs apt-get update only when it must.
# Called by `make setup`; safe as root on a fresh Debian 12 machine, a no-op elsewhere.
set -euo pipefail

# command -> Debian package that provides it
declare -A PACKAGES=(
  [docker-compose]=docker-compose
  [chromium]=chromium
  [chromedriver]=chromium-driver
)

missing=()
for cmd in "${!PACKAGES[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${PACKAGES[$cmd]}")
done
# Debian's own python3 ships venv/ensurepip separately (`make setup` creates a virtualenv).
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: not a Debian system; install manually: ${missing[*]}" >&2
  exit 0
fi
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo -n)
  else
    echo "system-deps: need root to install: ${missing[*]} (the tests that need them will fail)" >&2
    exit 0
  fi
fi

export DEBIAN_FRONTEND=noninteractive
# Update the package lists only when they are absent or the package is unknown to them.
if ! apt-cache show "${missing[@]}" >/dev/null 2>&1; then
  "${SUDO[@]}" apt-get update -qq
fi
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
echo "system-deps: installed ${missing[*]}"
