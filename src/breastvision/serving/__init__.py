"""Using a trained model: predict, export to ONNX, and a local web page with a REST endpoint."""
