"""The Spark preprocessing job (``preprocess``) and the pure functions it maps over partitions: decoding
(``decode``) and normalizing to TorchXRayVision's tensors (``tensor``); ``sample`` makes synthetic images."""
