"""Export: ONNX (FP32/FP16), TensorRT engines, verification and the bundle writer (installed as medfedpure.export)."""
