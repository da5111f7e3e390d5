"""The ACT model that training and serving both use: the head, its configuration and presets,
normalisation, action selection, the trainable backbone, and the checkpoints a run is saved in."""
