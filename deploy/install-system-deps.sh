#!/usr/bin/env bash
# Install the Debian packages given as arguments, only those that are missing.
# Runs apt-get directly as root, through sudo otherwise. Used by `make test`.
set -euo pipefail
missing=()
for pkg in "$@"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done
# Node from another source (nodesource, nvm) satisfies nodejs/npm.
if command -v node >/dev/null && command -v npm >/dev/null; then
  filtered=()
  for pkg in "${missing[@]:-}"; do
    [[ "$pkg" == nodejs || "$pkg" == npm || -z "$pkg" ]] || filtered+=("$pkg")
  done
  missing=("${filtered[@]:-}")
fi
[[ ${#missing[@]} -eq 0 || -z "${missing[0]:-}" ]] && exit 0
echo "installing Debian packages: ${missing[*]}"
if [[ $(id -u) -eq 0 ]]; then
  SUDO=()
elif command -v sudo >/dev/null; then
  SUDO=(sudo)
else
  echo "error: missing Debian packages (${missing[*]}) and neither root nor sudo available" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
