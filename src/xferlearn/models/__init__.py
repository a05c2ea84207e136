"""Stage 2, models: backbones and their weights, the self-describing checkpoint, the fast
inference path, frozen features and the PyTorch predictor. Imports data/ only.
"""
