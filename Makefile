# adaptgate: every set-up step lives here, so a fresh clone needs only `make serve` / `make test`.
VENV       ?= .venv
PY         := $(VENV)/bin/python
PIP        := $(PY) -m pip
# The CPU build of torch lies on this machine's disk; an unpinned torch would pull a CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP      := $(VENV)/.installed
PROTOS     := $(wildcard protos/adaptgate/v1/*.proto)
# The Python client (its own package, adaptgate-client); the gateway imports its generated gRPC modules.
CLIENT     := clients/python
OLD_GEN    := services/adaptgate/v1

.PHONY: setup proto serve test test-unit test-integration demo bench bench-serving clean

setup: $(STAMP)

# The client first: the gateway depends on it (adaptgate-client, found installed rather than on an index).
# The editable install also builds the optional fused CPU kernels (setup.py) in place, beside
# engine/cpu_kernels.py (git-ignored); editing a kernel source reinstalls. Without a C compiler it
# still succeeds, and the engine runs PyTorch ops.
$(STAMP): pyproject.toml setup.py $(wildcard services/adaptgate/engine/kernels/*) $(CLIENT)/pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ./$(CLIENT)
	$(PIP) install -q -e ".[dev]"
	@$(PY) -c "import torch, adaptgate.engine._cpu_kernels" 2>/dev/null \
	  || echo "note: the fused CPU kernels were not built (no C compiler with AVX512-BF16 support?): the engine runs PyTorch ops"
	rm -f $(OLD_GEN)/*_pb2*.py $(OLD_GEN)/*_pb2*.pyi
	touch $@

# adaptgate_client.v1 is generated ahead of time and checked in (installing the client needs no protoc):
# regenerate after editing a .proto; tests/unit/test_client_package.py fails until then.
proto: $(STAMP)
	$(PY) $(CLIENT)/tools/generate_stubs.py

serve: setup
	$(VENV)/bin/adaptgate serve

test: setup
	$(PY) -m pytest -q

test-unit: setup
	$(PY) -m pytest -q -m 'not integration' tests/unit

test-integration: setup
	$(PY) -m pytest -q tests/integration

demo: setup
	$(VENV)/bin/adaptgate demo --data examples/data/sms_spam

# The peer servers the bench compares against, in their own venv (their pins differ from ours).
PEERS       ?= .venv-peers
PEERS_STAMP := $(PEERS)/.installed
INFINITY_SPEC ?= infinity-emb[torch,server]==0.0.78

$(PEERS_STAMP):
	python3 -m venv $(PEERS)
	$(PEERS)/bin/pip install -q "$(TORCH_SPEC)"
	$(PEERS)/bin/pip install -q "$(INFINITY_SPEC)"
	touch $@

# Every section in one run (the training section dominates); figures and how to read them: docs/performance.md.
bench: setup $(PEERS_STAMP)
	$(PY) bench/run.py
	$(PY) bench/http_api.py
	$(PY) bench/multi_adapter.py
	$(PY) bench/end_to_end.py
	$(PY) bench/load.py --scenario both
	$(PY) bench/out_of_scope.py
	$(PY) bench/training.py $(BENCH_TRAINING_ARGS)

# The serving sections only (a few minutes).
bench-serving: setup $(PEERS_STAMP)
	$(PY) bench/run.py
	$(PY) bench/http_api.py
	$(PY) bench/multi_adapter.py

clean:
	rm -rf $(VENV) $(PEERS) $(OLD_GEN)/*_pb2*.py $(OLD_GEN)/*_pb2*.pyi
