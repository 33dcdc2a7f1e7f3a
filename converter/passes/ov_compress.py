"""Pass ``ov_compress``: re-save an OpenVINO IR with its float weights compressed to fp16
(``openvino.save_model(compress_to_fp16=True)``), or as fp32. The CPU plugin decompresses fp16 weights at load
time; the IR still runs at the inference precision the bundle's settings ask for (f32 or bf16)."""

from __future__ import annotations

from pathlib import Path

import msgspec

from converter.passes import Pass, PassResult
from converter.passes import _openvino as ovh


class CompressConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    compress_to_fp16: bool = True


class OvCompress(Pass):
    name = "ov_compress"
    Config = CompressConfig
    toolchain = ovh.OV_TOOLCHAIN

    def run(self, model_path: Path, config: CompressConfig, out_path: Path) -> PassResult:
        ovh.save(ovh.read(model_path), Path(out_path), compress_to_fp16=config.compress_to_fp16)
        return self.result(config, out_path, {"weights": "fp16" if config.compress_to_fp16 else "fp32",
                                              "size_bytes": ovh.ir_stats(Path(out_path))["size_bytes"]})


PASS = OvCompress()
