"""`edgefleet toolchain`: make (once, into the cache) the toolchains the converter runs besides its own venv.

    edgefleet toolchain arm64 [--json]    the emulated aarch64 (converter/arm64.py): Debian 12 arm64 under qemu
                                          cortex-a76 with the agent's runtime wheels, where the arm target's
                                          variants are judged on ARM kernels
    edgefleet toolchain onnx2tf [--json]  the onnx2tf venv the arm target's TFLite variants are made with
"""

from __future__ import annotations

import argparse
import json


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="edgefleet toolchain", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("name", choices=("arm64", "onnx2tf"), help="which toolchain")
    parser.add_argument("--json", action="store_true", help="print where it is as JSON")
    args = parser.parse_args(argv)
    if args.name == "arm64":
        from converter import arm64

        if arm64.native():
            path, note = None, "this host is aarch64: its own kernels judge the arm target; nothing to make"
        else:
            path, note = arm64.ensure(), f"qemu {arm64.CPU}, Debian {arm64.SUITE} arm64, {' '.join(arm64.WHEELS)}"
    else:
        from converter.toolchain import onnx2tf_venv

        path, note = onnx2tf_venv(), "onnx2tf"
    if args.json:
        print(json.dumps({"toolchain": args.name, "path": None if path is None else str(path), "note": note}))
    else:
        print(f"{args.name}: {path or '-'} ({note})")
    return 0
