"""Pretrained backbones from ``keras.applications``, with offline options.

``weights`` follows Keras' own convention, plus ``"none"`` for the command line:
``"imagenet"`` downloads the ImageNet weights (needs internet once; Keras caches
them in ``~/.keras/models``), ``None`` or ``"none"`` initialises randomly, and any
other string is the path of a local no-top weights file.
"""

import dataclasses
import logging
import warnings
from pathlib import Path

from helpers.errors import MissingFileError, UsageError


logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Backbone:
    """The constants of one ``keras.applications`` backbone, in one place (importing this
    module does not import Keras: the scripts use them in ``--help`` before it loads).

    Attributes:
        name: the nested model's name, as Keras names it (``"xception"``); what
            ``training.set_backbone_trainable`` looks for.
        application: the ``keras.applications`` constructor's name (``"Xception"``).
        layers: ``len(application(include_top=False).layers)``: its input layer included, a
            ``pooling=`` layer not counted; ``--fine-tune-layers N`` unfreezes the top N of them.
        min_size: the smallest input height and width in pixels Keras accepts.
        features: channels of its last feature map (the pooled feature vector's length).
    """

    name: str
    application: str
    layers: int
    min_size: int
    features: int

    def constructor(self):
        """The ``keras.applications`` constructor (``keras.applications.Xception``)."""
        import keras

        return getattr(keras.applications, self.application)

    def preprocess_input(self, images):
        """The backbone's ``keras.applications.<module>.preprocess_input`` on RGB 0..255
        ``images`` (any shape ending in 3 channels; float32 in, float32 out)."""
        import keras

        return getattr(keras.applications, self.application.lower()).preprocess_input(images)

    def check_arguments(self, image_size=None, fine_tune_layers=None):
        """The one check of the backbone's two size arguments, which every script takes
        (``--image-size``, ``--fine-tune-layers``; ``None``: not checked, or for
        ``fine_tune_layers`` all layers).

        Raises:
            helpers.errors.UsageError: ``image_size`` below ``min_size``, or ``fine_tune_layers``
                outside ``[0, layers]``; the message echoes it (``Received: image_size=64``).
        """
        from helpers.errors import UsageError

        if image_size is not None and image_size < self.min_size:
            raise UsageError(f"image_size must be at least {self.min_size} ({self.application}'s minimum). "
                             f"Received: image_size={image_size}")
        if fine_tune_layers is not None and not 0 <= fine_tune_layers <= self.layers:
            raise UsageError(f"fine_tune_layers must be in [0, {self.layers}] ({self.application} without top has "
                             f"{self.layers} layers). Received: fine_tune_layers={fine_tune_layers}")


XCEPTION = Backbone("xception", "Xception", layers=132, min_size=71, features=2048)  # preprocessing: [-1, 1]
VGG16 = Backbone("vgg16", "VGG16", layers=19, min_size=32, features=512)  # preprocessing: BGR, ImageNet means off


class WeightsUnavailableError(UsageError):
    """The ImageNet weights could not be downloaded or the file could not be loaded."""


def resolve_weights(weights):
    """Normalise a ``weights`` argument to ``"imagenet"``, ``None`` or an existing path.

    Raises:
        MissingFileError: ``weights`` is a path that does not exist (a ``FileNotFoundError``).
    """
    if weights is None or (isinstance(weights, str) and weights.lower() == "none"):
        return None
    if weights == "imagenet":
        return weights
    path = Path(weights).expanduser()
    if path.is_dir():
        raise MissingFileError(f"Backbone weights {path} is a folder, not a weights file. Use weights='imagenet' "
                               "(download), 'none' (random) or the path of a no-top weights file.")
    if not path.is_file():
        raise MissingFileError(
            f"Backbone weights file {path} does not exist. Use weights='imagenet' "
            "(download), 'none' (random) or the path of a no-top weights file."
        )
    return str(path)


def pretrained_backbone(application, weights, dtype_policy="float32", **kwargs):
    """Builds ``application(include_top=False, weights=..., **kwargs)`` with clear errors.

    Args:
        application: a ``keras.applications`` constructor, e.g. ``keras.applications.Xception``.
        weights: ``"imagenet"``, ``None``/``"none"``, or a path to a no-top weights file.
        dtype_policy: the Keras dtype policy of every backbone layer (``"float32"``,
            ``"mixed_bfloat16"``, ``"mixed_float16"``; see ``helpers.precision``). The
            weights stay float32 either way; a mixed backbone outputs its compute dtype.
        **kwargs: passed on (``input_shape``, ``pooling``, ...).

    Returns:
        The backbone, a functional ``keras.Model`` named as Keras names it
        (``"xception"``, ``"vgg16"``).

    Raises:
        MissingFileError: ``weights`` is a path that does not exist (a ``FileNotFoundError``).
        WeightsUnavailableError: the ImageNet download failed, or the file does not
            fit the architecture. The message names both offline options.
    """
    from helpers import precision

    weights = resolve_weights(weights)
    name = application.__name__
    try:
        # Keras warns once per layer (about 150 lines) before it fails on a file of another
        # architecture: held back, and shown only when the backbone loads after all.
        with warnings.catch_warnings(record=True) as held, precision.policy_scope(dtype_policy):
            warnings.simplefilter("always")
            backbone = application(include_top=False, weights=weights, **kwargs)
        for warning in held:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        return backbone
    except Exception as error:  # Keras raises a bare Exception for a failed download
        if weights is None:
            raise
        what = (
            f"Could not download the ImageNet {name} weights"
            if weights == "imagenet"
            else f"Could not load {name} no-top weights from {weights}"
        )
        detail = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
        raise WeightsUnavailableError(
            f"{what} ({type(error).__name__}: {detail}). Offline options: "
            f"--weights none (random initialisation) or --weights PATH to a local "
            f"{name} no-top weights file (from keras.applications.{name}(include_top=False), "
            f"e.g. saved with model.save_weights('x.weights.h5'))."
        ) from error
