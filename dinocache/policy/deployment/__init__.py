"""Stage three, ``dinocache export`` and what runs on the robot: the fused policy, its export formats and
parity check, :func:`dinocache.load_policy`'s runtime with ACT's action selection, and its latency benchmark."""
