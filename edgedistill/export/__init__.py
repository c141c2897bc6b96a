"""Export of a distilled student: ONNX (fp32, fp16, INT8 QDQ), TensorRT engines, Torch-TensorRT programs.

Precision lives in the ONNX graph (docs/design.md#precision-in-the-onnx-graph): TensorRT builds strongly typed
engines from the fp16 or QDQ graph, so every precision also runs on CPU through onnxruntime.
"""
