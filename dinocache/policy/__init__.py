"""The ACT policy, in three packages that mirror the pipeline's stages two and three.

* :mod:`dinocache.policy.model`: what training and serving share: the ACT head (config, presets,
  transformer, normalisation, action selection) and the run folder's checkpoints it is saved in.
* :mod:`dinocache.policy.training`: stage two, ``dinocache train`` (on cached features, online, or
  fine-tuning the backbone from its cache).
* :mod:`dinocache.policy.deployment`: stage three, ``dinocache export``: the fused backbone + head,
  its export (``torch.export``, AOTInductor, ONNX, a LeRobot folder) with its parity check, and
  :func:`dinocache.load_policy`'s runtime on the robot.

Each stage builds on the model and the layers below (datasets, encoders, pipeline), never on the
other stage (``tests/test_layering.py``).
"""
