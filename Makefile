# The README's two commands: `make start` and `make test`. Both install what they need.
# `make test` runs everything; `make test-quick` leaves out the tests marked slow or daemon
# (markers set in test/conftest.py) and `make test-slow` runs only those: the two together
# are `make test`. PYTEST_ARGS passes more options to pytest (e.g. -x, -k name).
.PHONY: start test test-quick test-slow lint bootstrap

# The daemon says itself where it listens (its "listening on" line): no guess here.
start:
	@tools/bootstrap
	@echo "dpvoip: starting; Ctrl-C stops it"
	.venv/bin/dpvoip run $(if $(CONFIG),--config $(CONFIG),)

test:
	@tools/bootstrap dev
	.venv/bin/ruff check dpvoip test bench twisted etc/dpvoip.tac
	.venv/bin/mypy
	.venv/bin/python -m pytest $(PYTEST_ARGS)

test-quick:
	@tools/bootstrap dev
	.venv/bin/ruff check dpvoip test bench twisted etc/dpvoip.tac
	.venv/bin/mypy
	.venv/bin/python -m pytest -m "not slow and not daemon" $(PYTEST_ARGS)

test-slow:
	@tools/bootstrap dev
	.venv/bin/python -m pytest -m "slow or daemon" $(PYTEST_ARGS)

lint:
	.venv/bin/ruff check dpvoip test bench twisted
	.venv/bin/mypy
