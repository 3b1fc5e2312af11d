# Every target sets itself up: venvs per supported Python are created on demand.
PYTHONS ?= 3.11 3.12 3.13
PY ?= 3.11

.PHONY: demo test bench bench-quick corpus clean
.venv-%/.ready: pyproject.toml setup.py livepatch-autostart.pth
	@py=$$(sh scripts/find-python $*) && rm -rf .venv-$* && $$py -m venv .venv-$* \
	  && .venv-$*/bin/python -m pip install -q --disable-pip-version-check -e '.[test,bench]' \
	  && touch $@

# the demo's own venv: livepatch and matplotlib only, not the test and benchmark extras
.venv-demo-%/.ready: pyproject.toml setup.py livepatch-autostart.pth
	@echo "setting up .venv-demo-$* once: a virtualenv with livepatch, its four dependencies and matplotlib for the chart"
	@py=$$(sh scripts/find-python $*) && rm -rf .venv-demo-$* && $$py -m venv .venv-demo-$* \
	  && .venv-demo-$*/bin/python -m pip install -q --disable-pip-version-check -e '.[demo]' \
	  && touch $@ && echo "done; running the demo"

demo: .venv-demo-$(PY)/.ready
	.venv-demo-$(PY)/bin/python demo_apps/live_demo.py

test: $(foreach v,$(PYTHONS),.venv-$(v)/.ready)
	@set -e; for v in $(PYTHONS); do \
	  echo "=== tests on Python $$v ==="; \
	  .venv-$$v/bin/python -m pytest -n 2 -q -p no:cacheprovider tests; \
	done

BENCHMARKS = pause memory safepoint stall walk_moves agent alternatives tree startup protocol_fuzz repository values_apply soak

# switch_points needs sys.monitoring: it runs on 3.12 and 3.13 whatever PY is
MONITORING_PYTHONS = 3.12 3.13

bench: .venv-$(PY)/.ready $(foreach v,$(MONITORING_PYTHONS),.venv-$(v)/.ready)
	@set -e; for b in $(BENCHMARKS); do echo "=== $$b ==="; .venv-$(PY)/bin/python benchmarks/$$b.py; done
	@set -e; for v in $(MONITORING_PYTHONS); do echo "=== switch_points on $$v ==="; \
	  .venv-$$v/bin/python benchmarks/switch_points.py; done

bench-quick: .venv-$(PY)/.ready $(foreach v,$(MONITORING_PYTHONS),.venv-$(v)/.ready)
	@set -e; for b in $(BENCHMARKS); do echo "=== $$b ==="; .venv-$(PY)/bin/python benchmarks/$$b.py --quick; done
	@set -e; for v in $(MONITORING_PYTHONS); do echo "=== switch_points on $$v ==="; \
	  .venv-$$v/bin/python benchmarks/switch_points.py --quick; done

# real security releases built from their wheels and applied live (needs PyPI; not part of test or bench)
corpus: .venv-$(PY)/.ready
	.venv-$(PY)/bin/python benchmarks/corpus.py

clean:
	rm -rf .venv-* *.egg-info
