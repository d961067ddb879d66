"""Runtimes: onnxruntime (``ort``: sessions, providers, the activation runner, optimized models),
TensorRT (``trt``, imported lazily, the only module that imports ``tensorrt``) and ``trtexec``
command lines."""
