"""Stage 5, deploy: ONNX and TorchScript export, int8 quantisation, the prediction engines
and the HTTP service. Imports every stage below it, never training/.
"""
