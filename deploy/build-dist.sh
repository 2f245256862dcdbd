#!/usr/bin/env bash
# Build the production artefact: dist/storegate-<version>-<arch>.tar.gz
#
#   storegate-<version>-<arch>/
#     VERSION  SHA256SUMS  install.sh  install-system-deps.sh  README.md
#     requirements/gateway.lock  requirements/hq.lock   (pins + sha256 of every file)
#     wheels/        storegate-<version>-py3-none-any.whl and every pinned dependency
#     systemd/  sysusers.d/  udev/  modprobe.d/  examples/ (gateway.example.toml, hq.example.toml)
#
# The wheels are the locked versions only, checked against the lock's hashes as
# they are downloaded; the box installs them with no index and no compiler
# (install.sh). No demo-only package (amqtt) is in it. pyscard and evdev are
# not either: a store box takes Debian's python3-pyscard and python3-evdev.
#
#   deploy/build-dist.sh                 # for this machine's architecture
#   deploy/build-dist.sh aarch64         # for a Raspberry Pi (64-bit), from any machine
set -euo pipefail
cd "$(dirname "$0")/.."
ARCH=${1:-$(uname -m)}
PYTHON=${PYTHON:-python3}
VERSION=$($PYTHON -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
NAME=storegate-$VERSION-$ARCH
OUT=dist/$NAME
TOOLS=.cache/build-venv

case $ARCH in
  x86_64|aarch64) ;;
  *) echo "build-dist: architecture $ARCH: only x86_64 and aarch64 (64-bit Raspberry Pi OS) have every wheel" >&2; exit 2 ;;
esac
PLATFORM_ARGS=()
if [[ $ARCH != $(uname -m) ]]; then
  # Wheels for another machine: every manylinux tag a Bookworm box (glibc 2.36) takes.
  for tag in manylinux2014 manylinux_2_17 manylinux_2_24 manylinux_2_28 manylinux_2_31 manylinux_2_34 manylinux_2_35 manylinux_2_36; do
    PLATFORM_ARGS+=(--platform "${tag}_$ARCH")
  done
  PLATFORM_ARGS+=(--implementation cp --python-version 3.11 --abi cp311 --abi abi3 --abi none)
fi

[[ -x $TOOLS/bin/pip ]] || $PYTHON -m venv "$TOOLS"
rm -rf "$OUT" "dist/$NAME.tar.gz"
mkdir -p "$OUT/wheels" "$OUT/requirements"

# The project's own wheel (pure Python), then the locked dependencies as wheels only.
"$TOOLS/bin/pip" wheel -q --no-deps -w "$OUT/wheels" .
rm -rf build   # setuptools' build directory
for lock in requirements/gateway.lock requirements/hq.lock; do
  "$TOOLS/bin/pip" download -q --only-binary=:all: --require-hashes --no-deps "${PLATFORM_ARGS[@]}" \
    -r "$lock" -d "$OUT/wheels"
  cp "$lock" "$OUT/requirements/"
done
if ls "$OUT/wheels" | grep -qi '^amqtt'; then
  echo "build-dist: amqtt (the demo's broker) got into the production wheels" >&2
  exit 1
fi

cp deploy/install.sh deploy/install-system-deps.sh README.md "$OUT/"
cp -r deploy/systemd deploy/sysusers.d deploy/udev deploy/modprobe.d "$OUT/"
mkdir -p "$OUT/examples"
cp deploy/gateway.example.toml deploy/hq.example.toml "$OUT/examples/"
echo "$VERSION" > "$OUT/VERSION"
(cd "$OUT" && find . -type f ! -name SHA256SUMS -printf '%P\n' | LC_ALL=C sort | xargs sha256sum > SHA256SUMS)
tar -C dist -czf "dist/$NAME.tar.gz" "$NAME"
echo "dist/$NAME.tar.gz: $(ls "$OUT/wheels" | wc -l) wheels, $(du -sh "dist/$NAME.tar.gz" | cut -f1)"
