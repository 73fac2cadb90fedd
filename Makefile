# The two entry points of the README. Each runs the idempotent set-up first.
.PHONY: setup run test lint

setup:
	bash deploy/setup.sh

run: setup
	.venv/bin/xma2 serve

test: setup
	.venv/bin/python -m pytest -q

lint: setup
	.venv/bin/ruff check core task_store server tests bench
	.venv/bin/mypy  # strict, over the modules that [tool.mypy] in pyproject.toml selects
