"""raydistill tasks: *what* is computed (pure Python + torch/transformers/peft).

Nothing in this package imports ray, mlflow or deepspeed; ``tests/unit/test_layering.py`` checks it.
"""
