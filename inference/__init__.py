"""The TorchXRayVision batch inference job (issue 3, in progress): weights resolution so far."""
