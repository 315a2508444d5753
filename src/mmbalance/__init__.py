"""mmbalance: imbalanced multimodal learning on one honest engine."""
__version__ = "0.1.0"
