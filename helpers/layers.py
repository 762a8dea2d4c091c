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
