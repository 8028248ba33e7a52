"""The ops' and the model's benchmarks, one script each (``python benchmarks/<name>.py`` or ``python -m
benchmarks.<name>``: the package must be importable, as ``pip install -e .`` or ``PYTHONPATH`` makes it), and
``harness``, what they share."""
