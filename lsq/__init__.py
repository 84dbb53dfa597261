"""lsq: LoRA-Squeeze. Train a LoRA adapter at a high rank, squeeze it exactly to lower ranks, recover.

The library is pure functions on tensors, state dicts, configs and paths; it never imports prefect or
mlflow. Entry points: :func:`lsq.api.squeeze_adapter`, :func:`lsq.squeeze.squeeze_state_dict`,
:func:`lsq.linalg.factored_svd`, and the ``lsq`` command (:mod:`lsq.cli`).
"""

__version__ = "0.1.0"
