"""aimesh: asynchronous AI inference over Kafka and Triton."""

__version__ = "0.1.0"
