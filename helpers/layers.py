"""Small registered layers for the models' custom steps.

Registered with ``keras.saving.register_keras_serializable``, so a saved ``.keras``
model loads with ``keras.saving.load_model(path)`` in safe mode once this module
is imported (``import cnn_rnn_classifier`` imports it). A ``Lambda`` would not load
in safe mode.
"""

import keras

PACKAGE = "cnn_rnn"


@keras.saving.register_keras_serializable(package=PACKAGE)
class Grayscale(keras.layers.Layer):
    """Averages the channels of an image batch into one grayscale channel.

    The seed (``000_*.txt``) turns the RGB input into a 299x299x1 grayscale image
    before it feeds the RNN branch; the plain channel mean is used, so a
    Xception-preprocessed input in [-1, 1] stays in [-1, 1].

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


@keras.saving.register_keras_serializable(package=PACKAGE)
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


@keras.saving.register_keras_serializable(package=PACKAGE)
class FrameMask(keras.layers.Layer):
    """The ``(batch, frames)`` mask of real frames: False where a frame is all ``PAD_VALUE``.

    ``keras.layers.Masking`` on 5-D frames gives a ``(batch, frames, height, width)``
    mask that the GRU cannot use; this one is what a recurrent layer expects.

    Input: ``(batch, frames, height, width, channels)`` float, padded with ``PAD_VALUE``.
    Output: ``(batch, frames)`` bool.
    """

    def call(self, inputs):
        return keras.ops.any(keras.ops.not_equal(inputs, PAD_VALUE), axis=(2, 3, 4))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:2])


@keras.saving.register_keras_serializable(package=PACKAGE)
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
