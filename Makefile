# Herald's two commands: `make run` (embedded default, chat page on :8000) and `make test`.
PORT ?= 8000
HOST ?= 127.0.0.1
PYTEST_ARGS ?=

.PHONY: run test lint bench

run:
	scripts/bootstrap run
	.venv/bin/herald serve --app app.main:create_app --host $(HOST) --port $(PORT)

test:
	scripts/bootstrap test
	.venv/bin/pytest $(PYTEST_ARGS)

lint:
	scripts/bootstrap test
	.venv/bin/ruff check app tests bench
	.venv/bin/mypy

bench:
	scripts/bootstrap bench
	.venv/bin/python -m bench
