# The README's two commands: `make start` and `make test`. Both install what they need.
.PHONY: start test lint bootstrap

start:
	@tools/bootstrap
	@echo "dpvoip: starting (embedded PostgreSQL in ./var, web on 127.0.0.1:8080); Ctrl-C stops it"
	.venv/bin/dpvoip run $(if $(CONFIG),--config $(CONFIG),)

test:
	@tools/bootstrap dev
	.venv/bin/ruff check dpvoip test bench twisted etc/dpvoip.tac
	.venv/bin/mypy
	.venv/bin/python -m pytest $(PYTEST_ARGS)

lint:
	.venv/bin/ruff check dpvoip test bench twisted
	.venv/bin/mypy
