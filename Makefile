# Two commands on a fresh machine:  `make example`  and  `make test`.
VENV ?= .venv
BIN := $(VENV)/bin
EXAMPLE := examples/sd15_tiny_kohya.safetensors

.PHONY: example test docs lint clean

$(BIN)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The CPU wheel on local disk first, so nothing pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test,docs]'
	# Bytecode now, as a regular pip install does: start-up must not recompile (PYTHONDONTWRITEBYTECODE).
	$(BIN)/python -m compileall -q loraformats plugins >/dev/null
	touch $@

example: $(BIN)/.installed
	@mkdir -p out
	$(BIN)/loraformats detect $(EXAMPLE)
	$(BIN)/loraformats convert $(EXAMPLE) --to diffusers -o out/sd15_tiny.diffusers.safetensors --force
	$(BIN)/loraformats verify $(EXAMPLE) out/sd15_tiny.diffusers.safetensors

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

docs: $(BIN)/.installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

lint: $(BIN)/.installed
	$(BIN)/ruff check .

clean:
	rm -rf out site
