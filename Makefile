# Everything a fresh clone needs: `make demo` and `make test` create .venv, install the CPU build of
# torch first (pinned, so pip never resolves a CUDA torch: the package metadata asks for torch>=2.13,<2.14,
# which this wheel satisfies), then the project with its extras (test, chain, hf), which builds the native
# extension. Stamp files make a second run take seconds.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
TORCH  := torch==2.13.0
# Build requirements installed into the venv so the editable build runs without isolation (no second
# download of them, and an incremental CMake build tree in build/).
BUILD_DEPS := "setuptools>=77" wheel "pybind11>=2.12"

NATIVE_SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu') CMakeLists.txt setup.py pyproject.toml

# Extras: chain (web3, eth-tester, ...: tensorlink.chain and a node's --chain-rpc), hf (transformers: the
# demo's GPT-2), test (pytest, ruff, mypy). The suite and the demo need all three.
EXTRAS := test,chain,hf

.PHONY: demo test typecheck bench install contracts system-deps clean help

help:
	@echo "make demo   set everything up and train a GPT-2 across a local swarm of node processes"
	@echo "make test   set everything up, then ruff and the test suite"
	@echo "make typecheck  mypy on src/ (its settings are in pyproject.toml)"
	@echo "make bench  run every benchmark in benchmarks/"
	@echo "make contracts  install the pinned Solidity compiler, OpenZeppelin and anvil (then: node contracts/compile.js)"
	@echo "make clean  remove the venv and build outputs"

$(VENV)/.stamp-venv:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	touch $@

$(VENV)/.stamp-torch: $(VENV)/.stamp-venv
	$(PIP) install $(TORCH)
	touch $@

$(VENV)/.stamp-install: $(VENV)/.stamp-torch $(NATIVE_SOURCES)
	$(PIP) install $(BUILD_DEPS)
	$(PIP) install --no-build-isolation -e ".[$(EXTRAS)]"
	$(PY) -c "import tensorlink, tensorlink._C as C; print('tensorlink._C built; CUDA compiled in:', C.cuda_compiled())"
	touch $@

# The NAT traversal tests (tests/netns) build network namespaces with iptables NAT routers; the machines
# that run them (CI included) run tests as root. Elsewhere this only warns and the NAT tests say why
# they cannot run.
# The dashboard tests (tests/node/test_dashboard_browser.py) drive Debian's headless chromium through chromedriver.
system-deps:
	@command -v iptables >/dev/null 2>&1 && command -v ip >/dev/null 2>&1 && test -f /usr/include/openssl/evp.h && \
		command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || \
		(apt-get update && apt-get install -y iptables iproute2 libssl-dev chromium chromium-driver) || \
		echo "warning: could not install iptables/iproute2/libssl-dev/chromium (needs root and apt); the build needs libssl-dev, the tests/netns NAT tests iptables, the dashboard tests chromium and chromium-driver"

install: system-deps $(VENV)/.stamp-install

# The Solidity toolchain (issue 7): solcjs 0.8.28, OpenZeppelin 5.4.0 and anvil 1.7.1, exactly as pinned in
# contracts/package-lock.json. Nothing there needs an install script (anvil's binary arrives as an optional
# platform package), so none runs. The compiled artifacts in contracts/build/ are committed, so the Python
# package needs none of this; the tests use it to check that build/ matches the sources and to start anvil.
# After changing contracts/src or contracts/test: `node contracts/compile.js`, then commit contracts/build/.
CONTRACTS_STAMP := contracts/node_modules/.stamp-npm

$(CONTRACTS_STAMP): contracts/package-lock.json contracts/package.json
	cd contracts && npm ci --ignore-scripts --no-audit --no-fund
	touch $@

contracts: $(CONTRACTS_STAMP)

# The story in one command (issue 6): a LocalSwarm of a validator and two workers trains a small GPT-2
# with tensorlink.offload() on the corpus in src/tensorlink/data, then samples from it (about 4 minutes
# on 2 CPU cores; see `python -m tensorlink.demo --help`). The benchmarks of the parts it is built on
# (wire codec, Stage IR, data plane) add another minute on such a machine, so they run under `make bench`.
demo: install
	$(PY) -m tensorlink.demo

# mypy on src/ (settings in pyproject.toml: every type: ignore names its code and is needed) before the tests.
test: install contracts typecheck
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest

typecheck: install
	$(PY) -m mypy

# hivemind, the baseline of benchmarks/inference.py's remote call, in a venv of its own: its pins must never
# touch the project's .venv. The same CPU torch as .venv; hivemind's wheel carries its p2pd binary.
HIVEMIND_VENV := .venv-hivemind

$(HIVEMIND_VENV)/.stamp:
	$(PYTHON) -m venv $(HIVEMIND_VENV)
	$(HIVEMIND_VENV)/bin/python -m pip --disable-pip-version-check -q install $(TORCH) hivemind==1.1.12
	touch $@

# benchmarks/zoo.py and benchmarks/inference.py are being written (issue 14): each runs when present, so
# that `make bench` does not fail before they land. tests/test_packaging.py checks that every script in
# benchmarks/ is named here (benchmarks/inference.py runs hivemind_remote_expert.py under $(HIVEMIND_VENV)).
bench: install contracts $(HIVEMIND_VENV)/.stamp
	$(PY) benchmarks/wire.py
	$(PY) benchmarks/dht.py
	$(PY) benchmarks/ir.py
	$(PY) benchmarks/ir_fuzz.py --cases 20000
	$(PY) benchmarks/transport.py
	$(PY) benchmarks/pipeline.py
	$(PY) benchmarks/gpu_overlap.py
	$(PY) benchmarks/gas.py
	# Every architecture of the installed transformers, four families: about 3-5 hours on 2 CPU cores.
	$(PY) benchmarks/zoo.py --family all --jobs 2
	$(PY) benchmarks/inference.py

clean:
	rm -rf $(VENV) $(HIVEMIND_VENV) build src/tensorlink/_C*.so src/*.egg-info contracts/node_modules
