"""EntityCLIP in JAX/Flax: entity-centric image-text matching."""

__version__ = "0.1.0"
