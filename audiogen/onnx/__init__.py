"""ONNX backend: export an `AudioGen` to three ONNX graphs and run generation through onnxruntime.

    audiogen export-onnx MODEL OUT_DIR
    model = AudioGen.from_onnx(OUT_DIR)          # same engine, sampling, CFG, seeds and API

`audiogen.onnx.export` writes the graphs (wrappers in `audiogen.onnx.graphs`), `audiogen.onnx.runtime` plugs
onnxruntime sessions into the engine. onnx/onnxruntime are imported only when used (`pip install audiogen[onnx]`).
"""

from audiogen.onnx.export import export_onnx

__all__ = ["export_onnx"]
