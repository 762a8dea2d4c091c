"""Soft attention over an image's feature grid for the caption decoder (Show, Attend and Tell).

Source: Xu et al., "Show, Attend and Tell: Neural Image Caption Generation with Visual
Attention", ICML 2015, section 3 ("deterministic soft attention"). At every word step the
LSTM looks at the ``L`` positions of the backbone's last feature map (the annotation vectors
``a_i``, here Xception's 10 x 10 x 2048 at 299 px, so ``L = 100``)::

    e_ti  = w . tanh(W_a a_i + W_h h_{t-1})            (attention MLP, eq. 4)
    alpha = softmax_i(e_t)                              (eq. 5)
    z_t   = beta_t * sum_i alpha_ti a_i,  beta_t = sigmoid(f_beta(h_{t-1}))   (gating scalar, 4.2.1)
    h_t, c_t = LSTM([E y_{t-1}, z_t], h_{t-1}, c_t-1)   (eq. 1-3)
    h_0, c_0 = tanh(f_init,h(mean_i a_i)), tanh(f_init,c(mean_i a_i))          (3.1.2)

The deep output layer (eq. 7) and the doubly stochastic penalty (eq. 14,
``DoublyStochasticPenalty``) are built around this layer by ``captioning.build_decoder``.

Written with ``keras.ops`` (the time loop is ``keras.ops.scan``), so it runs on every
backend; registered for safe-mode loading.
"""

import keras
from keras import ops

from helpers.serialization import serializable


@serializable()
class SoftAttentionLSTM(keras.layers.Layer):
    """An LSTM that attends over a set of annotation vectors at every step (Xu et al. 2015).

    Args:
        units: LSTM units ``U``.
        attention_dim: size ``A`` of the attention MLP's hidden layer.

    Inputs: ``[words, annotations]``: ``(batch, steps, E)`` float32 word embeddings (teacher
    forcing: ``<start> w1 ... wn``; an optional ``(batch, steps)`` mask marks the real steps)
    and ``(images, L, D)`` float32 annotation vectors (the feature grid, positions flattened).
    ``batch`` is ``images * C``: ``C`` captions per image, image-major (C = 1: one caption each).
    The per-image work (the attention keys, the initial state) is done once per image, not once
    per caption: phase 1 feeds all of an image's captions with one copy of its grid.

    Outputs: ``[hidden, contexts, alphas]``: ``(batch, steps, U)`` the LSTM output ``h_t``,
    ``(batch, steps, D)`` the gated context ``z_t``, ``(batch, steps, L)`` the attention
    weights ``alpha_t`` (each row sums to 1). All carry the words' mask. At padded steps the
    values are computed as at any step (the loss and penalty mask them out).
    """

    def __init__(self, units, attention_dim=512, **kwargs):
        super().__init__(**kwargs)
        self.units, self.attention_dim = int(units), int(attention_dim)
        self.supports_masking = True
        self.key = keras.layers.Dense(self.attention_dim, use_bias=False, name="key")
        self.query = keras.layers.Dense(self.attention_dim, name="query")
        self.score = keras.layers.Dense(1, name="score")
        self.gate = keras.layers.Dense(1, activation="sigmoid", name="gate")
        self.init_h = keras.layers.Dense(self.units, activation="tanh", name="init_h")
        self.init_c = keras.layers.Dense(self.units, activation="tanh", name="init_c")

    def build(self, input_shape):
        words_shape, annotations_shape = input_shape
        embedding, feature_dim = words_shape[-1], annotations_shape[-1]
        self.key.build(tuple(annotations_shape))
        self.query.build((None, self.units))
        self.score.build((None, None, self.attention_dim))
        self.gate.build((None, self.units))
        self.init_h.build((None, feature_dim))
        self.init_c.build((None, feature_dim))
        u = self.units
        self.word_kernel = self.add_weight(shape=(embedding, 4 * u), initializer="glorot_uniform", name="word_kernel")
        self.context_kernel = self.add_weight(shape=(feature_dim, 4 * u), initializer="glorot_uniform",
                                              name="context_kernel")
        self.recurrent_kernel = self.add_weight(shape=(u, 4 * u), initializer="orthogonal", name="recurrent_kernel")
        # Gates in Keras' LSTM order (input, forget, cell, output), forget bias 1 (Jozefowicz et al. 2015).
        self.bias = self.add_weight(shape=(4 * u,), name="bias", initializer=keras.initializers.Constant(
            [0.0] * u + [1.0] * u + [0.0] * 2 * u))

    def initial_state(self, annotations, captions=1):
        """``(h_0, c_0, keys)`` for ``captions`` captions per image: ``(images * captions, U)``
        twice (image-major: rows ``i * captions .. i * captions + captions - 1`` are image
        ``i``'s), and the annotations' attention keys ``W_a a_i``, ``(images, L, A)``, computed
        once per image."""
        mean = ops.mean(annotations, axis=1)
        return self._per_caption(self.init_h(mean), captions), self._per_caption(self.init_c(mean), captions), \
            self.key(annotations)

    @staticmethod
    def _per_caption(rows, captions):
        """``(images, n)`` -> ``(images * captions, n)``, each row repeated ``captions`` times."""
        images, size = ops.shape(rows)[0], ops.shape(rows)[1]
        return ops.reshape(ops.broadcast_to(ops.expand_dims(rows, 1), (images, captions, size)),
                           (images * captions, size))

    def attend(self, h, annotations, keys):
        """``(z, alpha)`` for states ``h`` ``(images * C, U)``, image-major (C captions or beam
        hypotheses per image, ``C`` = the row ratio): the gated context ``(images * C, D)``
        and the weights ``(images * C, L)``."""
        images, positions = ops.shape(keys)[0], ops.shape(keys)[1]
        query = ops.reshape(self.query(h), (images, -1, 1, self.attention_dim))  # (images, C, 1, A)
        energies = ops.squeeze(self.score(ops.tanh(ops.expand_dims(keys, 1) + query)), -1)  # (images, C, L)
        alpha = ops.softmax(energies, axis=-1)
        context = ops.einsum("bcl,bld->bcd", alpha, annotations)
        context = ops.reshape(context, (-1, ops.shape(annotations)[2]))
        return self.gate(h) * context, ops.reshape(alpha, (-1, positions))

    def _cell(self, word_gates, h, c, annotations, keys):
        z, alpha = self.attend(h, annotations, keys)
        gates = word_gates + ops.matmul(z, self.context_kernel) + ops.matmul(h, self.recurrent_kernel)
        i, f, g, o = ops.split(gates, 4, axis=-1)
        c = ops.sigmoid(f) * c + ops.sigmoid(i) * ops.tanh(g)
        h = ops.sigmoid(o) * ops.tanh(c)
        return h, c, z, alpha

    def step(self, words, h, c, annotations, keys):
        """One decoding step for ``words`` ``(images * C, E)``, the embedded previous words,
        image-major as ``h``; ``annotations`` and ``keys`` are per image (``initial_state``).

        Returns:
            ``(h, c, z, alpha)``: the new state ``(images * C, U)`` twice, the context
            ``(images * C, D)`` and the attention weights ``(images * C, L)`` that produced them.
        """
        return self._cell(ops.matmul(words, self.word_kernel) + self.bias, h, c, annotations, keys)

    def call(self, inputs, mask=None):
        words, annotations = inputs
        captions = ops.shape(words)[0] // ops.shape(annotations)[0]
        h, c, keys = self.initial_state(annotations, captions)
        word_gates = ops.matmul(words, self.word_kernel) + self.bias  # (batch, steps, 4U), outside the loop

        def step(carry, gates_t):
            h, c, _, _ = carry
            state = self._cell(gates_t, h, c, annotations, keys)
            return state, state  # Keras' TensorFlow scan wants its outputs shaped as its carry

        batch = ops.shape(words)[0]
        start = (h, c, ops.zeros((batch, ops.shape(annotations)[2])), ops.zeros((batch, ops.shape(annotations)[1])))
        _, (hidden, _, contexts, alphas) = ops.scan(step, start, ops.transpose(word_gates, (1, 0, 2)))
        return [ops.transpose(t, (1, 0, 2)) for t in (hidden, contexts, alphas)]

    def compute_mask(self, inputs, mask=None):
        words_mask = mask[0] if isinstance(mask, (list, tuple)) else mask
        return [words_mask] * 3

    def compute_output_shape(self, input_shape):
        (batch, steps, _), (_, positions, feature_dim) = input_shape
        return [(batch, steps, self.units), (batch, steps, feature_dim), (batch, steps, positions)]

    def get_config(self):
        return {**super().get_config(), "units": self.units, "attention_dim": self.attention_dim}


@serializable()
class DoublyStochasticPenalty(keras.layers.Layer):
    """Adds Xu et al.'s doubly stochastic attention penalty (eq. 14) to the model's loss and
    passes the weights through.

    Xu et al.: ``lambda * sum_i (1 - sum_t alpha_ti)^2``. With ``T`` real steps and ``L``
    positions the weights sum to ``T`` over a caption, so that equals
    ``L (1 - T/L)^2 + sum_i (T/L - sum_t alpha_ti)^2``: a term constant in the weights
    (about 77 for a 12-step caption over 100 positions) plus the spread of the coverage
    around its even share. This layer adds the second term only, ``weight * mean_batch
    sum_i (T/L - sum_t alpha_ti)^2``: the same gradients as Xu's, and 0 when the caption
    covers every position evenly, so the logged loss stays the cross-entropy plus a small
    number. The sums over t take the caption's real steps only (the mask). Xu et al. add it
    to the caption's summed negative log-likelihood with ``lambda`` 1; here the cross-entropy
    is the mean per word, as in most reimplementations.

    Args:
        weight: ``lambda`` >= 0; 0 turns the penalty off.

    Inputs: ``[sequence, alphas]``: any ``(batch, steps, ...)`` tensor (the LSTM output; it
    carries the layer into the model's graph) and the ``(batch, steps, L)`` attention weights,
    each with an optional ``(batch, steps)`` mask.
    Output: ``sequence``, unchanged, with its mask.
    """

    def __init__(self, weight=1.0, **kwargs):
        super().__init__(**kwargs)
        self.weight = float(weight)
        self.supports_masking = True

    def call(self, inputs, mask=None):
        sequence, alphas = inputs
        if self.weight:
            alpha_mask = mask[1] if isinstance(mask, (list, tuple)) else None
            steps = ops.ones_like(alphas[:, :, 0]) if alpha_mask is None else ops.cast(alpha_mask, alphas.dtype)
            coverage = ops.sum(alphas * ops.expand_dims(steps, -1), axis=1)  # (batch, L)
            share = ops.sum(steps, axis=1, keepdims=True) / ops.cast(ops.shape(alphas)[-1], alphas.dtype)
            self.add_loss(self.weight * ops.mean(ops.sum(ops.square(share - coverage), axis=-1)))
        return sequence

    def compute_mask(self, inputs, mask=None):
        return mask[0] if isinstance(mask, (list, tuple)) else None

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0])

    def get_config(self):
        return {**super().get_config(), "weight": self.weight}
