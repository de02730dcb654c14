"""The TorchXRayVision batch inference job and its container (``Dockerfile``: torch, no JVM).

``weights`` resolves and verifies the model weights; ``job`` holds the engines (ONNX Runtime, the CPU
default; a frozen TorchScript graph, bit-exact to eager; eager PyTorch, the CUDA default), reads the
``image_id`` column of ``tensors`` first and then the tensors of only the row groups holding rows to
score (delta-rs, bounded batches), and MERGEs ``predictions``.
"""
