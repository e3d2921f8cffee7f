"""microvmc: a declarative spec-to-VM compiler."""

__version__ = "0.1.0"
