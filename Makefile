# Two commands do everything on a fresh machine: `make demo` and `make test`.
# The pinned ComfyUI host (ComfyUI 0.3.75 + torch, outside the repo, keyed by scripts/host/pins.txt) is built
# on first use; set COMFYUI_PATH=/your/ComfyUI (and COMFYUI_PYTHON) to use your own ComfyUI instead.
SHELL := /bin/bash
HOST := source scripts/host/env.sh &&
PYTEST_ARGS ?=

.PHONY: host demo test test-unit bench soak ui clean-host docs-assets

host:
	@bash scripts/host/setup.sh >/dev/null

demo: host
	@$(HOST) "$$HOST_PY" scripts/demo.py $(if $(CKPT),--ckpt "$(CKPT)") $(if $(LORA),--lora "$(LORA)") $(if $(OUT),--out "$(OUT)")

test: host
	@$(HOST) "$$HOST_PY" -m pytest -c tests/pytest.ini tests $(PYTEST_ARGS)

test-unit: host
	@$(HOST) "$$HOST_PY" -m pytest -c tests/pytest.ini tests/unit $(PYTEST_ARGS)

# Refresh the README's screenshots and the bad-input matrix from the tests that record them.
docs-assets: host
	@$(HOST) TCD_UPDATE_DOCS=1 "$$HOST_PY" -m pytest -c tests/pytest.ini tests/ui/test_workflows_ui.py tests/server/test_hardening.py $(PYTEST_ARGS)

bench: host
	@$(HOST) "$$HOST_PY" benchmarks/run_all.py

clean-host:
	@$(HOST) rm -rf "$$HOST_DIR"

soak: host
	@$(HOST) "$$HOST_PY" scripts/soak.py
