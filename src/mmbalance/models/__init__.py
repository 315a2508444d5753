"""Models: encoder registry, fusion registry and :class:`MultimodalModel`."""
from .encoders import ENCODERS, create_encoder, list_encoders, register_encoder
from .fusions import FUSIONS, Fusion, create_fusion, list_fusions, register_fusion
from .model import ABSENT_POLICIES, MultimodalModel, Output

__all__ = ["ENCODERS", "FUSIONS", "Fusion", "MultimodalModel", "Output", "ABSENT_POLICIES",
           "create_encoder", "create_fusion", "list_encoders", "list_fusions", "register_encoder",
           "register_fusion"]
