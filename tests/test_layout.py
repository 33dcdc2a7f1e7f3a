"""What the package promises about itself: a light agent path, and a README that documents it all."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import msgspec

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()

HEAVY = ("onnx", "openvino", "nncf", "tensorflow", "starlette", "uvicorn", "fleet", "converter")


def test_the_agent_path_imports_no_host_toolchain():
    code = (
        "import sys\n"
        "import edgefleet.cli, agent.cli, agent.daemon, agent.api, agent.updater, agent.link, agent.store\n"
        "from agent import runtimes; runtimes.available()\n"
        "print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert not set(HEAVY) & set(out), set(HEAVY) & set(out)


def test_every_agent_config_key_is_in_the_readme():
    from agent.config import AgentConfig

    for field in msgspec.structs.fields(AgentConfig):
        assert re.search(rf"\| `{field.name}` \|", README), f"agent.toml key {field.name} is not in README.md"


def test_every_command_is_in_the_readme():
    from edgefleet.cli import COMMANDS

    for name in COMMANDS:
        assert f"edgefleet {name}" in README, f"`edgefleet {name}` is not in README.md"
    for sub in ("serve", "deploy", "devices", "health", "tag", "rollouts", "rollout", "token", "audit"):
        assert f"edgefleet fleet {sub}" in README
    for sub in ("run", "infer", "status", "install", "uninstall"):
        assert f"edgefleet agent {sub}" in README


def test_help_works_for_every_command():
    for args in (["--help"], ["convert", "--help"], ["agent", "--help"], ["fleet", "--help"], ["demo", "--help"],
                 ["models", "--help"], ["fleet", "health", "--help"], ["agent", "run", "--help"]):
        r = subprocess.run([sys.executable, "-m", "edgefleet.cli", *args], capture_output=True, text=True)
        assert r.returncode == 0 and "usage" in r.stdout.lower(), (args, r.stderr)


def test_unknown_command_is_one_line_and_exit_2():
    r = subprocess.run([sys.executable, "-m", "edgefleet.cli", "frobnicate"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown command 'frobnicate'" in r.stderr and "Traceback" not in r.stderr


def test_ci_runs_the_readme_test_command():
    assert "make test" in README
    assert "make test" in (ROOT / ".ci" / "run").read_text()
