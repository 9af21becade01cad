"""rnngen: train, export and serve recurrent language models.

Two worlds meet at one `.onnx` file: training and export (`rnngen.training`)
need torch; loading, generating and serving (`rnngen.model`, `rnngen.decoding`,
`rnngen.serving`) need only onnxruntime and numpy. Imports point one way:
cli -> plugins, serving -> inspect, scoring, training -> decoding -> model
(checked by the import-linter contracts in pyproject.toml).
"""

__version__ = "0.1.0"
