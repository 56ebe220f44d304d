"""Training and evaluation of the tiny Code Llama bundled with the package (``codellama/assets/tiny``).

Run from the repository root: ``python -m training.train_tiny`` and ``python -m training.evaluate_tiny``.
"""
