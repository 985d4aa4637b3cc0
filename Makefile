# The two set-up commands of the README:
#   make demo   sets everything up and runs the end-to-end demo
#   make test   sets everything up and runs the test suite (.ci/run calls this)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Debian packages that building KenLM's lmplz/build_binary needs.
APT_PKGS := cmake build-essential libboost-program-options-dev libboost-system-dev \
            libboost-thread-dev libboost-test-dev zlib1g-dev libbz2-dev liblzma-dev

.PHONY: setup demo test bench system-deps clean

setup: $(VENV)/.installed

system-deps:
	@missing=$$(for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian packages: $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "warning: KenLM tools need these Debian packages: $$missing (sudo apt-get install $$missing)"; \
	  fi; \
	fi

# --system-site-packages: a torch already on the machine (CPU or CUDA build) is reused
# instead of downloading another one.
$(VENV)/.installed: pyproject.toml | system-deps
	$(PY) -m venv --system-site-packages $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: setup
	$(BIN)/d2v demo

test: setup
	$(BIN)/python -m pytest -x tests

bench: setup
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) d2v-work
