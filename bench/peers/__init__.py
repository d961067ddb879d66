"""The peers' quantizers, each a script run in its own process by the peers' environment
(``make peers-env``: CPU torch, AMD Quark, aimet-onnx), never imported by quantkit or its tests."""
