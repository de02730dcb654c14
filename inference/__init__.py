"""The TorchXRayVision batch inference job and its container (``Dockerfile``: torch, no JVM).

``weights`` resolves and verifies the model weights; ``job`` holds the engines (eager PyTorch, a frozen
TorchScript graph, ONNX Runtime on the CPU), reads ``tensors`` in bounded batches with delta-rs and
MERGEs ``predictions``.
"""
