"""Model definitions shared by training and serving.

Owns the architectures (registered by name), their config dataclasses, the preprocessing that
travels with a checkpoint, and the checkpoint format. Imports only torch and the standard library.
"""

from models import ensemble as _ensemble  # noqa: F401
from models import fusion as _fusion  # noqa: F401  (registers architectures)
from models import image_cnn as _image_cnn  # noqa: F401
from models import text_models as _text_models  # noqa: F401
from models import trunk as _trunk  # noqa: F401
from models.registry import available_models, build_model, get_model_spec

__all__ = ["available_models", "build_model", "get_model_spec"]
