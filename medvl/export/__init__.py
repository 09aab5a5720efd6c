"""Trained runs in formats other tools read: ONNX (:mod:`medvl.export.onnx`, ``medvl export onnx``)."""
