"""freeze-scaffold: render, inspect and test the freeze-template Copier template."""

__version__ = "0.1.0"
