"""Stage 4, training: the Lightning loop, the linear and fine-tune recipes, the operating
point chosen on validation, and `train()`. Imports data/, models/ and evaluation/.
"""
