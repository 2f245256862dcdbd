#!/usr/bin/env bash
# Install or upgrade storegate from an unpacked artefact (deploy/build-dist.sh).
#
#   sudo ./install.sh                 # a store box: the gateway
#   sudo ./install.sh --role hq       # HQ: the bridge and its nightly timer
#   ./install.sh --prefix DIR --no-system   # only the venv (tests, a chroot)
#
# What it does, in order; it never touches the data (/var/lib/storegate: the
# journal, rules, member store; /var/lib/storegate-hq) nor an existing config
# (/etc/storegate/*.toml):
#   1. checks every file against SHA256SUMS;
#   2. system (unless --no-system): the Debian packages the role needs (gateway:
#      python3-venv pcscd libccid python3-pyscard python3-evdev — Debian builds the
#      reader libraries, so the box needs no compiler; hq: python3-venv), the
#      users (sysusers.d), for the gateway the udev rule, the pn533 blacklist and
#      the "gpio" group where it exists (Raspberry Pi OS);
#   3. a new venv PREFIX/versions/<version> (gateway: with system site packages,
#      for Debian's pyscard, evdev and, on Raspberry Pi OS, lgpio), filled from
#      wheels/ with no index: the locked versions, hash-checked, then storegate;
#   4. checks `storegate --version`, then points PREFIX/venv at the new venv in
#      one rename (the units run PREFIX/venv/bin/...);
#   5. system: the units (daemon-reload, enable) and a restart of a running
#      service onto the new version; the two previous versions stay for a rollback
#      (README, "Install in production").
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROLE=gateway
PREFIX=/opt/storegate
SYSTEM=1
FORCE=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --role) ROLE=$2; shift 2 ;;
    --prefix) PREFIX=$2; shift 2 ;;
    --no-system) SYSTEM=0; shift ;;
    --force) FORCE=1; shift ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
[[ $ROLE == gateway || $ROLE == hq ]] || { echo "install.sh: --role gateway|hq" >&2; exit 2; }
VERSION=$(cat "$HERE/VERSION")
PYTHON=${PYTHON:-/usr/bin/python3}
say() { echo "install.sh: $*"; }

# 1. the artefact is whole
(cd "$HERE" && sha256sum --quiet --check SHA256SUMS) || { echo "install.sh: SHA256SUMS does not match: a damaged artefact" >&2; exit 1; }

# 2. system
if [[ $SYSTEM == 1 ]]; then
  [[ $(id -u) -eq 0 ]] || { echo "install.sh: run as root (or --no-system)" >&2; exit 1; }
  if [[ $ROLE == gateway ]]; then
    bash "$HERE/install-system-deps.sh" python3-venv pcscd libccid python3-pyscard python3-evdev
  else
    bash "$HERE/install-system-deps.sh" python3-venv
  fi
  install -D -m 0644 "$HERE/sysusers.d/storegate.conf" /usr/lib/sysusers.d/storegate.conf
  systemd-sysusers /usr/lib/sysusers.d/storegate.conf
  if [[ $ROLE == gateway ]]; then
    if getent group gpio >/dev/null; then usermod -a -G gpio storegate; fi   # LEDs, buzzer (Raspberry Pi OS)
    install -D -m 0644 "$HERE/udev/99-storegate.rules" /etc/udev/rules.d/99-storegate.rules
    install -D -m 0644 "$HERE/modprobe.d/storegate-blacklist.conf" /etc/modprobe.d/storegate-blacklist.conf
    if [[ -S /run/udev/control ]]; then
      udevadm control --reload && udevadm trigger --subsystem-match=input || true
    fi
  fi
  install -d -m 0755 /etc/storegate
  install -m 0644 "$HERE/examples/$ROLE.example.toml" "/etc/storegate/$ROLE.example.toml"
fi

# 3. the venv of this version
mkdir -p "$PREFIX/versions"
install -m 0644 "$HERE/README.md" "$PREFIX/README.md"
DIR=$PREFIX/versions/$VERSION
CURRENT=$(readlink "$PREFIX/venv" 2>/dev/null || true)
INSTALL=1
if [[ $CURRENT == "versions/$VERSION" && -x $DIR/bin/storegate && $FORCE == 0 ]]; then
  say "storegate $VERSION is installed already (--force to install it again)"
  INSTALL=0
elif [[ $CURRENT == "versions/$VERSION" ]]; then
  DIR=$PREFIX/versions/$VERSION.$(date +%s)  # never rewrite the venv a running service loads from
else
  rm -rf "$DIR"                             # a failed or older install of this version
fi
if [[ $INSTALL == 1 ]]; then
  VENV_ARGS=()
  [[ $ROLE == gateway ]] && VENV_ARGS+=(--system-site-packages)
  "$PYTHON" -m venv "${VENV_ARGS[@]}" "$DIR"
  # Only what is in the artefact: no index, no pip configuration of the host.
  unset PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_CONSTRAINT PIP_REQUIRE_VIRTUALENV
  export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1
  "$DIR/bin/python" -m pip install -q --no-index --find-links "$HERE/wheels" --require-hashes \
    -r "$HERE/requirements/$ROLE.lock"
  "$DIR/bin/python" -m pip install -q --no-index --no-deps "$HERE"/wheels/storegate-"$VERSION"-*.whl
  # 4. it runs, then it is the one
  got=$("$DIR/bin/storegate" --version)
  [[ $got == "storegate $VERSION" ]] || { echo "install.sh: the new venv says '$got', not storegate $VERSION" >&2; exit 1; }
  if [[ $ROLE == gateway ]] && ! "$DIR/bin/python" -c "import smartcard.scard, evdev" 2>/dev/null; then
    say "warning: pyscard or evdev cannot load: real readers will not work (apt-get install python3-pyscard python3-evdev)"
  fi
  ln -sfn "${DIR#"$PREFIX/"}" "$PREFIX/venv.new"
  mv -T "$PREFIX/venv.new" "$PREFIX/venv"
  say "storegate $VERSION in $DIR; $PREFIX/venv points at it${CURRENT:+ (was $CURRENT)}"
fi

# Keep the current version and the two newest others (rollback: README, "Install in production").
keep=$(readlink "$PREFIX/venv")
ls -1dt "$PREFIX"/versions/*/ 2>/dev/null | sed 's:/$::' | while read -r old; do
  [[ ${old#"$PREFIX/"} == "$keep" ]] && continue
  echo "$old"
done | tail -n +3 | xargs -r rm -rf

# 5. units
if [[ $SYSTEM == 1 ]]; then
  if [[ $ROLE == gateway ]]; then units=(storegate-gateway.service); else
    units=(storegate-hq.service storegate-hq-nightly.service storegate-hq-nightly.timer); fi
  for u in "${units[@]}"; do install -m 0644 "$HERE/systemd/$u" "/etc/systemd/system/$u"; done
  if [[ -d /run/systemd/system ]]; then
    systemctl daemon-reload
    if [[ $ROLE == gateway ]]; then
      systemctl enable storegate-gateway.service
      systemctl try-restart storegate-gateway.service   # a running gateway moves to the new version
    else
      systemctl enable storegate-hq.service storegate-hq-nightly.timer
      systemctl try-restart storegate-hq.service
    fi
  fi
  [[ -f /etc/storegate/$ROLE.toml ]] || say "next: write /etc/storegate/$ROLE.toml (from $ROLE.example.toml beside it), then systemctl start ${units[0]}"
fi
