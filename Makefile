# Two commands do all set-up on a fresh machine:
#   make run   - create .venv if missing, run the default simulation, print where the report page is
#   make test  - create .venv if missing (and, as root, Debian's headless Chromium), run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedcl-installed

.PHONY: run test test-fast lint format venv clean browser

venv: $(STAMP)

# torch 2.14.1 + torchvision 0.29.1 is the pair that imports together here (STACK-NOTES);
# pip takes both from the machine's local wheel cache.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m simulations.run $(if $(RUN_CONFIG),--run-config "$(RUN_CONFIG)")

# The report's screenshot test opens the page in a real headless Chromium (Debian's chromium-headless-shell,
# ~10 s to install); as root it is installed here, otherwise the test is skipped with a note.
browser:
	@command -v chromium-headless-shell >/dev/null || command -v chromium >/dev/null || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			chromium-headless-shell >/dev/null) || echo "note: chromium-headless-shell did not install"; \
	else echo "note: no headless Chromium (apt-get install chromium-headless-shell): the screenshot test is skipped"; fi

test: $(STAMP) browser
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not integration"

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf runs .pytest_cache
