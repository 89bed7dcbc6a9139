# Backdoor deployment gate. `make gate` and `make test` work as the first command on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

DEMO   := models/demo/gtsrb_badnets3x3.onnx
MODEL  ?= $(DEMO)
# The demo's own clean images go with the demo model only: another MODEL needs DATA=... (or
# GATE_ARGS=--synthetic for B3D-SS); without either the gate stops with a usage error (exit 4).
DATA   ?= $(if $(filter $(DEMO),$(MODEL)),models/demo/gtsrb_sample.npz)
POLICY ?= policies/default.yaml
OUT    ?= gate-out
GATE_ARGS ?=

.PHONY: install gate test lint models bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,forge]'
	touch $(STAMP)

# Scan MODEL under POLICY; exit 0 accept, 1 reject, 2 error, 3 review (a person must look), 4 usage error.
gate: $(STAMP)
	$(VENV)/bin/gate run $(MODEL) --policy $(POLICY) --out $(OUT) $(if $(DATA),--data $(DATA)) $(GATE_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check gate models tests bench

# Rebuild the demo models and the full forge zoo (torch, CPU, seeded).
models: $(STAMP)
	$(PY) -m models.forge --demo
	$(PY) -m models.forge --zoo

# The benchmark (issue 12): NC, B3D and B3D-SS verdicts on the wide zoo, cross-validated, per dataset, attack and
# architecture with 95 % intervals and the paper's numbers, from the committed scan records (minutes, nothing
# rescanned; BENCH_ARGS=--record rewrites bench/RESULTS.md's section), then the scan's speed against ONNX Runtime
# alone on the demo model, side by side. Rescanning the zoo takes hours: python -m bench.compare --wide --resume
# (bench/RESULTS.md has every command); the forge zoo's comparison: make models && python -m bench.compare.
BENCH_RECORDS ?= bench/screen_replay/traces bench/wide/compare bench/wide_nc2/compare bench/wide_ss_gtsrb/compare
bench: $(STAMP)
	$(PY) -m bench.verdicts --records $(BENCH_RECORDS) --blend-records bench/wide_blend_b2/compare \
		--check-records bench/wide_ss100/compare --folds 5 $(BENCH_ARGS)
	$(PY) -m bench.speed

clean:
	rm -rf $(OUT) .pytest_cache test-artifacts
