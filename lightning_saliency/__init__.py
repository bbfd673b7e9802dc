"""lightning-saliency: audit what a vision model looks at while it trains."""

__version__ = "0.1.0"
