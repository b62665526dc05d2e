"""trainer: the ranking model, its training, evaluation against the oracle, ONNX export and registry."""
