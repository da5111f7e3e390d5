"""Stage two, ``dinocache train``: an ACT head trained on cached features (or with the backbone in the
step), resumable, DDP under ``torchrun``. Start reading at :mod:`dinocache.policy.training.train`."""
