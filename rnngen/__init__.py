"""rnngen: train, export and serve recurrent language models.

Two worlds meet at one `.onnx` file: training and export (`rnngen.training`,
`rnngen.export`) need torch; generating (`rnngen.runtime`, `rnngen.generation`)
needs only onnxruntime and numpy.
"""

__version__ = "0.1.0"
