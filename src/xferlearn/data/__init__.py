"""Stage 1, data: decoding any image file (images), augmentation presets (augment), and
folders to manifests and leak-free splits (folders). Imports nothing above it.
"""
