"""Small registered layers for the models' custom steps.

Registered with ``keras.saving.register_keras_serializable``, so a saved ``.keras``
model loads with ``keras.saving.load_model(path)`` in safe mode once this module
is imported (``import cnn_rnn_classifier`` imports it). A ``Lambda`` would not load
in safe mode.
"""

import keras

from helpers import options
from helpers.errors import UsageError
from helpers.serialization import LEGACY_PACKAGE, PACKAGE, serializable  # noqa: F401 (used here and re-exported)


@serializable(legacy_name="Grayscale")
class ChannelMean(keras.layers.Layer):
    """The unweighted mean of an image batch's channels: the RNN branch's grayscale image.

    The seed (``000_*.txt``) turns the RGB input into a 299x299x1 grayscale image
    before it feeds the RNN branch; this is the plain channel mean (not luminance
    weights), so a Xception-preprocessed input in [-1, 1] stays in [-1, 1].

    Input: ``(batch, height, width, channels)`` float tensor.
    Output: ``(batch, height, width, 1)``, same dtype.
    """

    def call(self, inputs):
        return keras.ops.mean(inputs, axis=-1, keepdims=True)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (1,)


# Frames are padded with a value no real pixel (0..255) takes, so padding is never
# mistaken for a black frame.
PAD_VALUE = -1.0
VGG16_BGR_MEAN = (103.939, 116.779, 123.68)


@serializable()
class VGG16Preprocess(keras.layers.Layer):
    """VGG16's own preprocessing inside the model (``keras.applications.vgg16.preprocess_input``).

    RGB becomes BGR and the ImageNet channel means are subtracted ("caffe" mode).
    The seed's LRCN code fed raw pixels to VGG16; this layer fixes that, and keeps the
    model's input plain RGB pixels.

    Input: ``(batch, height, width, 3)`` float RGB in 0..255.
    Output: same shape, BGR, zero-centred per channel (no scaling).
    """

    def call(self, inputs):
        bgr = keras.ops.flip(inputs, axis=-1)
        return bgr - keras.ops.convert_to_tensor(VGG16_BGR_MEAN, dtype=inputs.dtype)


@serializable()
class FrameMask(keras.layers.Layer):
    """The ``(batch, frames)`` mask of real frames: False where a frame is all ``PAD_VALUE``.

    ``keras.layers.Masking`` on 5-D frames gives a ``(batch, frames, height, width)``
    mask that the GRU cannot use; this one is what a recurrent layer expects.

    Input: ``(batch, frames, height, width, channels)`` float pixels or ``(batch, frames,
    features)`` float feature clips, padded with ``PAD_VALUE``.
    Output: ``(batch, frames)`` bool.
    """

    def call(self, inputs):
        return keras.ops.any(keras.ops.not_equal(inputs, PAD_VALUE), axis=tuple(range(2, len(inputs.shape))))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:2])


@serializable()
class MiddleFrame(keras.layers.Layer):
    """The middle real frame of each sequence: the single-frame baseline's input.

    With ``n`` real frames (the mask's count; padding sits at the end), the frame at index
    ``(n - 1) // 2``: the middle one of an odd count, the earlier of the two middle ones of an
    even count.

    Input: ``[features, mask]``: ``(batch, frames, features)`` float and ``(batch, frames)`` bool.
    Output: ``(batch, features)``, the features' dtype.
    """

    def call(self, inputs):
        inputs, mask = inputs
        count = keras.ops.sum(keras.ops.cast(mask, "int32"), axis=1)
        index = keras.ops.maximum(count - 1, 0) // 2
        return keras.ops.take_along_axis(inputs, index[:, None, None], axis=1)[:, 0]

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], input_shape[0][-1])


@serializable()
class FoldFrames(keras.layers.Wrapper):
    """Applies a per-frame model to every frame by folding frames into the batch axis.

    ``(batch, frames, ...)`` is reshaped to ``(batch * frames, ...)``, the wrapped
    layer runs once on that, and the result is unfolded to ``(batch, frames, ...)``.
    It does what ``keras.layers.TimeDistributed`` does, but stays correct when the
    number of frames is not static inside a traced function: measured with
    TensorFlow 2.21 / Keras 3.15, ``TimeDistributed`` maps over ``ops.shape(x)[0]``
    (the batch size) there and returns ``(1, 1, ...)`` for a ``(1, 4, ...)`` input.

    Input: ``(batch, frames, *frame_shape)``; ``frames`` may be ``None``.
    Output: ``(batch, frames, *layer_output_shape[1:])``.
    """

    def call(self, inputs, training=None):
        shape = keras.ops.shape(inputs)
        folded = keras.ops.reshape(inputs, (-1,) + tuple(inputs.shape[2:]))
        outputs = self.layer(folded, training=training)
        return keras.ops.reshape(outputs, (shape[0], shape[1]) + tuple(outputs.shape[1:]))

    def compute_output_shape(self, input_shape):
        inner = self.layer.compute_output_shape((None,) + tuple(input_shape[2:]))
        return tuple(input_shape[:2]) + tuple(inner[1:])

    def build(self, input_shape):
        if not self.layer.built:
            self.layer.build((None,) + tuple(input_shape[2:]))
        self.built = True


@serializable()
class XceptionPreprocess(keras.layers.Layer):
    """Xception's own preprocessing inside the model (``keras.applications.xception.preprocess_input``,
    "tf" mode): pixels scaled from 0..255 to -1..1.

    Input: ``(batch, height, width, 3)`` float RGB in 0..255.
    Output: same shape and dtype, in [-1, 1].
    """

    def call(self, inputs):
        return inputs / 127.5 - 1.0


@serializable()
class PrependStep(keras.layers.Layer):
    """Puts a vector in front of a sequence as its first timestep (Show and Tell's image input).

    Inputs: ``[vector, sequence]``: ``(batch, features)`` and ``(batch, steps, features)``,
    same dtype; the sequence may carry a ``(batch, steps)`` mask.
    Output: ``(batch, steps + 1, features)``; its mask is True at the new first step and
    the sequence's mask after it.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, inputs):
        vector, sequence = inputs
        return keras.ops.concatenate([keras.ops.expand_dims(vector, 1), sequence], axis=1)

    def compute_mask(self, inputs, mask=None):
        sequence_mask = mask[1] if isinstance(mask, (list, tuple)) else None
        if sequence_mask is None:
            return None
        first = keras.ops.ones_like(sequence_mask[:, :1])
        return keras.ops.concatenate([first, sequence_mask], axis=1)

    def compute_output_shape(self, input_shape):
        vector, sequence = input_shape
        steps = None if sequence[1] is None else sequence[1] + 1
        return (sequence[0], steps, sequence[2])


@serializable()
class DropFirstStep(keras.layers.Layer):
    """Removes a sequence's first timestep, and its mask's: the output of ``PrependStep``'s step.

    Input: ``(batch, steps, features)``, optionally masked ``(batch, steps)``.
    Output: ``(batch, steps - 1, features)`` with the mask ``mask[:, 1:]``.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, inputs):
        return inputs[:, 1:]

    def compute_mask(self, inputs, mask=None):
        return None if mask is None else mask[:, 1:]

    def compute_output_shape(self, input_shape):
        steps = None if input_shape[1] is None else input_shape[1] - 1
        return (input_shape[0], steps) + tuple(input_shape[2:])


@serializable()
class AddToSteps(keras.layers.Layer):
    """Adds a vector to every timestep of a sequence (the "merge" architecture's image join,
    Tanti et al. 2017), keeping the sequence's mask.

    Inputs: ``[sequence, vector]``: ``(batch, steps, features)`` and ``(batch, features)``.
    Output: ``(batch, steps, features)``.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, inputs):
        sequence, vector = inputs
        return sequence + keras.ops.expand_dims(vector, 1)

    def compute_mask(self, inputs, mask=None):
        return mask[0] if isinstance(mask, (list, tuple)) else None

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0])


@serializable()
class HorizontalFlip(keras.layers.Layer):
    """Each image mirrored left to right: test-time augmentation's second view (``flip_averaged``).

    Input: ``(batch, height, width, channels)``; output: the same shape and dtype, column ``j``
    the input's column ``width - 1 - j``.
    """

    def call(self, images):
        return keras.ops.flip(images, axis=2)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)


TTA = options.TTA  # --tta


def flip_averaged(model, tta="flip"):
    """``model`` with test-time horizontal flips: its output averaged over each image and its mirror
    image (a standard test-time augmentation for photos, whose classes keep their identity when
    mirrored; twice the inference cost). ``tta="none"`` returns ``model`` itself.

    Args:
        model: a ``keras.Model`` from ``(batch, height, width, channels)`` images (any value range:
            the flip commutes with per-pixel preprocessing) to ``(batch, classes)`` probabilities.
        tta: one of ``TTA``.

    Returns:
        A ``keras.Model`` with ``model``'s name, input and output shapes: ``(model(x) +
        model(flip(x))) / 2``, still probabilities (each row sums to 1).

    Raises:
        UsageError: an unknown ``tta`` (a ``ValueError``).
    """
    if tta not in TTA:
        raise UsageError(f"tta must be one of {', '.join(TTA)}. Received: {tta!r}")
    if tta == "none":
        return model
    images = keras.Input(model.input_shape[1:], name="images")
    outputs = keras.layers.Average(name="flip_average", dtype="float32")(
        [model(images), model(HorizontalFlip(name="horizontal_flip")(images))])
    return keras.Model(images, outputs, name=model.name)


# The attention decoder's layers and the classifier's FusedLSTM register themselves on import:
# loading any saved model needs only this module imported.
from helpers import attention, recurrent  # noqa: E402,F401
