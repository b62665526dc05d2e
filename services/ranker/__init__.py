"""ranker: serves ranked feeds with ONNX Runtime from the online feature store. No torch here."""
