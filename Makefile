# The two commands of README.md. Each sets up what it needs first (scripts/setup.sh).
.PHONY: demo test setup bench clean

setup:
	@sh scripts/setup.sh

demo: setup
	.venv/bin/edgefleet demo

test:
	@sh scripts/setup.sh test
	.venv/bin/python -m pytest -q

clean:
	rm -rf .venv demo-out .pytest_cache
