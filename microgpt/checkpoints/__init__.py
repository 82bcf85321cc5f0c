"""Checkpoints: files written atomically and read safely (``io.py``), run folders (``runs.py``), and a model
rebuilt from a checkpoint (``loading.py``). No Lightning here."""
