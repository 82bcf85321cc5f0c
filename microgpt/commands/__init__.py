"""The commands: ``fit``/``validate``/``test``/``predict`` through LightningCLI (``cli.py``), and ``sample`` and
``serve``, which need only torch (and LitServe)."""
