# storegate — the two commands a newcomer needs:
#   make demo   run a whole store on this machine and print the day's summary
#   make test   install everything the tests need (apt + venv) and run the suite
#
# Works from a clean clone on Debian 12 / Raspberry Pi OS. `make demo` needs
# python3, python3-venv, make and git and nothing else: no compiler (the reader
# libraries pyscard and evdev, which ship no wheels, are the `readers` extra;
# `make fresh-check` proves it in a fresh Debian root). `make test` installs
# Debian packages with apt-get as root, or through sudo when we are not root.
#
# Production: `make dist` builds the versioned artefact from the lock files in
# requirements/ (`make lock` renews them); `sudo make install` installs it into
# /opt/storegate (deploy/install.sh; README, "Install in production").

PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(VENV)/bin/pip
MPY_DIR = .cache/micropython
MPY_PKG = @micropython/micropython-webassembly-pyscript@1.27.0

# Debian packages the test suite runs against (real broker, real PC/SC stack,
# gcc, headers and swig to build pyscard and evdev (the `readers` extra), node for the
# MicroPython interpreter, PostgreSQL for HQ, libfuse3 and fusermount3 for the power-cut
# file system of tests/powercut).
TEST_APT = mosquitto chromium fonts-wqy-zenhei pcscd vsmartcard-vpcd libpcsclite-dev swig python3-venv python3-dev gcc nodejs npm postgresql fuse3
# The demo needs nothing from apt beyond python3-venv: it uses mosquitto when
# installed, else an embedded broker from PyPI.

ARCH   ?= $(shell uname -m)
VERSION = $(shell $(PYTHON) -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
LOCK_TOOLS = .cache/lock-venv
PIP_COMPILE = $(LOCK_TOOLS)/bin/pip-compile -q --generate-hashes --strip-extras --allow-unsafe --no-emit-index-url

.PHONY: demo test test-long bench system-deps venv venv-test micropython clean lock dist install fresh-check

$(VENV)/.stamp-base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[embedded-broker,hq]'
	touch $@

$(VENV)/.stamp-test: $(VENV)/.stamp-base
	$(PIP) install -q -e '.[embedded-broker,hq,test]'
	touch $@

venv: $(VENV)/.stamp-base
venv-test: $(VENV)/.stamp-test

system-deps:
	@bash deploy/install-system-deps.sh $(TEST_APT)

$(MPY_DIR)/.stamp:
	mkdir -p $(MPY_DIR)
	cd $(MPY_DIR) && npm install --silent --no-audit --no-fund --prefix . $(MPY_PKG)
	touch $@

micropython: $(MPY_DIR)/.stamp

demo: venv
	$(PY) -m demo

test: system-deps
	$(MAKE) venv-test micropython
	$(PY) -m pytest -q

# The long fault-injection runs (>= 200 kills and the like).
test-long: system-deps
	$(MAKE) venv-test micropython
	$(PY) -m pytest -q --long

bench: venv-test
	@echo "run e.g. $(PY) -m bench.journal --quick"

# The production lock files: every package and its sha256s, for the store box
# (gateway.lock: no HQ, no demo broker, no readers: Debian's) and for HQ (hq.lock).
lock:
	test -x $(LOCK_TOOLS)/bin/pip-compile || ($(PYTHON) -m venv $(LOCK_TOOLS) && $(LOCK_TOOLS)/bin/pip install -q 'pip-tools>=7.4,<8')
	$(PIP_COMPILE) --extra gpio -o requirements/gateway.lock pyproject.toml
	$(PIP_COMPILE) --extra hq -o requirements/hq.lock pyproject.toml

# dist/storegate-<version>-<arch>.tar.gz (ARCH=aarch64 for a 64-bit Raspberry Pi, from any machine).
dist:
	bash deploy/build-dist.sh $(ARCH)

# Install or upgrade this machine (root): the gateway, or ROLE=hq.
ROLE ?= gateway
install: dist
	bash dist/storegate-$(VERSION)-$(ARCH)/install.sh --role $(ROLE)

# A fresh Debian 12 root (debootstrap, cached in /var/cache/storegate/fresh-check/) runs `make demo` (root).
fresh-check:
	bash .ci/fresh-check

clean:
	rm -rf $(VENV) .cache .pytest_cache *.egg-info dist
