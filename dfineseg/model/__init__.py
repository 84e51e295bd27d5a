"""D-FINE-seg model: HGNetv2 backbone, HybridEncoder, D-FINE decoder and the mask head.

`build_model(model_cfg, num_classes)` builds it; `DeployModel(model, topk)` is the exported graph;
`load_weights(model, path)` loads official D-FINE, HGNetv2 ImageNet or dfineseg weights.
"""

from dfineseg.model.dfine import SIZES, DeployModel, DFINESeg, build_model, count_parameters
from dfineseg.model.weights import LoadReport, WeightsError, load_weights

__all__ = ["SIZES", "DFINESeg", "DeployModel", "LoadReport", "WeightsError", "build_model", "count_parameters",
           "load_weights"]
