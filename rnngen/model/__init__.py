"""The model: its file format and checks, the Loop graph and the graphs derived from it,
devices, and `RnnModel` (rnngen.model.runtime), an rnngen file on onnxruntime. No torch."""
