"""flowers_classifier: serve an exported flower classifier (daisy, dandelion, rose, sunflower, tulip) with
torch, timm, open_clip and PIL only: no fastai, no network.

    import flowers_classifier as fc
    model = fc.load_cnn_model("cnn_flowers.pth")   # a bare name is also looked up in models/
    fc.predict(model, "rose.jpg")                   # -> "rose"
    fc.predict_proba(model, "rose.jpg")             # -> {"daisy": 0.01, "dandelion": 0.02, ...}
    fc.predict_batch(model, fc.find_images(["photos/"]), bs=32)   # -> one record per image
    model = fc.load_model("cnn_flowers.onnx")       # ONNX Runtime instead of torch (`export.py --onnx`)
    model = fc.load_model("cnn_flowers.pth", calibrated=False)  # raw softmax, ignoring the fitted temperature
    model = fc.load_model("vit_flowers.pth", backend="int8")  # int8 Linear layers on the CPU
    model = fc.load_model("flowers-hub/")            # a Hub folder (`export.py --hub DIR`): safetensors + config.json
    model = fc.load_model("hf-hub:ORG/NAME")         # that folder on the Hugging Face Hub (its cache; HF_HUB_OFFLINE)
    # backend="auto" (default) picks one: see load_model and backends.py

    python -m flowers_classifier PATH... [--model models/cnn_flowers.pth] [--top-k 3] [--json OUT] [--bs N]

Payloads are read with `torch.load(weights_only=True)`: a file holding pickled objects is refused
without running anything. Modules: `classes`, `preprocess` (decoding, eval crop), `model` (modules,
`FlowerClassifier`), `factory` (the architecture a payload names, random init), `payload` (the .pth format),
`inference` (load + predict), `hub` (the Hub folder, "hf-hub:" ids), `backends` (eager, int8, cpu-package,
onnx: what runs the network), `onnx_model` (serving an .onnx), `aot` (serving the compiled CPU package),
`quantize` (int8 on the CPU), `errors` (`FlowersError`, the base of every error the project raises), `cli`.
Writing an .onnx, compiling a package and pretrained weights are the trainer's (`flowers_fastai.onnx_export`,
`.cpu_package`, `.pretrained`): loading a model never imports them.
"""

from .backends import BackendError
from .classes import CLASSES
from .errors import FlowersError
from .hub import HubError
from .inference import (
    find_images,
    iter_predictions,
    iter_probabilities,
    load_cnn_model,
    load_ensemble,
    load_model,
    load_vit_model,
    model_from_payload,
    predict,
    predict_batch,
    predict_proba,
)
from .model import FlowerClassifier
from .onnx_model import load_onnx_model
from .payload import MODELS_DIR, ModelFileError, load_payload
from .preprocess import InvalidImageError

__version__ = "0.2.0"
__all__ = ["CLASSES", "BackendError", "FlowerClassifier", "FlowersError", "HubError", "InvalidImageError", "MODELS_DIR",
           "ModelFileError", "find_images", "iter_predictions", "iter_probabilities", "load_cnn_model",
           "load_ensemble", "load_model", "load_onnx_model", "load_payload", "load_vit_model",
           "model_from_payload", "predict", "predict_batch", "predict_proba"]
