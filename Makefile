# storegate — the two commands a newcomer needs:
#   make demo   run a whole store on this machine and print the day's summary
#   make test   install everything the tests need (apt + venv) and run the suite
#
# Works from a clean clone on Debian 12 / Raspberry Pi OS. System packages are
# installed with apt-get as root, or through sudo when we are not root.

PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(VENV)/bin/pip
MPY_DIR = .cache/micropython
MPY_PKG = @micropython/micropython-webassembly-pyscript@1.27.0

# Debian packages the test suite runs against (real broker, real PC/SC stack,
# headers to build pyscard, node for the MicroPython interpreter, PostgreSQL for HQ,
# libfuse3 and fusermount3 for the power-cut file system of tests/powercut).
TEST_APT = mosquitto pcscd vsmartcard-vpcd libpcsclite-dev swig python3-venv python3-dev gcc nodejs npm postgresql fuse3
# The demo needs nothing from apt: it uses mosquitto when installed, else an
# embedded broker from PyPI.

.PHONY: demo test test-long bench system-deps venv venv-test micropython clean

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
	$(VENV)/bin/storegate demo

test: system-deps
	$(MAKE) venv-test micropython
	$(PY) -m pytest -q

# The long fault-injection runs (>= 200 kills and the like).
test-long: system-deps
	$(MAKE) venv-test micropython
	$(PY) -m pytest -q --long

bench: venv-test
	@echo "run e.g. $(PY) -m bench.journal --quick"

clean:
	rm -rf $(VENV) .cache .pytest_cache *.egg-info
