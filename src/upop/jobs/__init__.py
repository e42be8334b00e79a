"""The jobs behind the CLI, one module each: train a dense base model, compress (search -> compress -> retrain ->
evaluate -> save), evaluate a saved model, measure a latency table; deploy (load a compressed directory, export it to
ONNX). What they share is in ``common``; what they report is in ``report`` (versioned dataclasses) and ``render``
(text and pictures). No job imports another."""
