"""The model zoo: one file per family, each registering its constructors."""

from . import convnet as _convnet  # noqa: F401  (registers)
from . import inception as _inception  # noqa: F401  (registers)
from . import mobilenet as _mobilenet  # noqa: F401  (registers)
from . import onet as _onet  # noqa: F401  (registers)
from . import resnet as _resnet  # noqa: F401  (registers)
from ._registry import create_model as create_model
from ._registry import list_models as list_models
from ._registry import register_model as register_model
