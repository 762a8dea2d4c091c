"""An LSTM with a faster training path where cuDNN is not available (CPUs).

``keras.layers.LSTM`` without cuDNN multiplies every timestep's input by the input
kernel inside the time loop, and its automatic gradient accumulates both kernels'
gradients one timestep at a time: at the classifier's seed configuration (batch 16,
23 timesteps of 3887 values, 2048 units) that is 2 x 23 read-modify-writes of a
64-127 MB gradient per layer per step. ``FusedLSTM`` computes the same function with:

* the input projection of all timesteps as one matmul, ``(batch * timesteps, input)
  @ (input, 4 * units)``, before the loop;
* only ``h @ recurrent_kernel`` and the gates inside the loop;
* a hand-written backward pass (``tf.custom_gradient``) that runs the loop backwards
  for the gate gradients only, then forms the recurrent kernel's gradient as one
  matmul ``h_prev^T @ d_gates`` over all timesteps (the input kernel's and the
  bias's gradients follow from the hoisted projection by ordinary autodiff).

Same weights, same configuration, same results as ``keras.layers.LSTM`` (tested to
float32 rounding), unless ``matmul_dtype="bfloat16"``: then every matmul of the fused
path (the input projection, the recurrent step, their gradients) reads bfloat16 copies of
its operands, while the weights, the gates, the states and their gradients stay float32,
as mixed precision does for a backbone; on a CPU with AMX or AVX512_BF16 that is the
fast kernel (tested against float32 to bfloat16 tolerance); it is a subclass, so a ``FusedLSTM`` checkpoint loads its weights
into an ``LSTM`` and back. Where the fused path does not apply it defers to
``keras.layers.LSTM`` unchanged: on a GPU (cuDNN is faster still), with a mask,
with dropout or recurrent dropout while training, with activations other than
tanh/sigmoid, ``go_backwards``, ``stateful`` or ``unroll``.
Benchmark: ``benchmarks/throughput_benchmark.py``; the layer alone is measured in the
README's performance section.
"""

import keras

from helpers.serialization import serializable


def _matmul(a, b, dtype, **kwargs):
    """``tf.matmul`` of ``a`` and ``b`` read as ``dtype``, returned in ``a``'s dtype."""
    import tensorflow as tf

    if dtype == a.dtype:
        return tf.matmul(a, b, **kwargs)
    return tf.cast(tf.matmul(tf.cast(a, dtype), tf.cast(b, dtype), **kwargs), a.dtype)


def _lstm_recurrence(projected, h0, c0, recurrent_kernel, matmul_dtype=None):
    """The LSTM time loop on inputs already multiplied by the input kernel (plus bias).

    Args:
        projected: ``(timesteps, batch, 4 * units)`` float, time-major,
            ``x_t @ kernel + bias`` in Keras's gate order (input, forget, cell, output).
        h0, c0: ``(batch, units)`` initial hidden and carry states.
        recurrent_kernel: ``(units, 4 * units)``.
        matmul_dtype: the dtype the matmuls read (default: ``projected``'s).

    Returns:
        ``(hidden, carry)``: ``(timesteps, batch, units)`` hidden states of every step
        and the last carry ``(batch, units)``.
    """
    import tensorflow as tf

    matmul_dtype = tf.as_dtype(matmul_dtype or projected.dtype)

    @tf.custom_gradient
    def recurrence(projected, h0, c0, recurrent_kernel):
        kernel = tf.cast(recurrent_kernel, matmul_dtype)  # cast once, not per step

        def step(state, z):
            h, c, _ = state
            i, f, g, o = tf.split(z + _matmul(h, kernel, matmul_dtype), 4, axis=-1)
            i, f, g, o = tf.sigmoid(i), tf.sigmoid(f), tf.tanh(g), tf.sigmoid(o)
            c = f * c + i * g
            return o * tf.tanh(c), c, (i, f, g, o)

        no_gates = (tf.zeros_like(h0),) * 4
        # tf.scan (a while loop): the graph, and its tracing time, stay small for long
        # sequences. A Python-unrolled loop measured no faster at 23 timesteps.
        hidden, carries, gates = tf.scan(step, projected, initializer=(h0, c0, no_gates))
        carries_prev = tf.concat([c0[tf.newaxis], carries[:-1]], axis=0)

        def backward(d_hidden, d_carry):
            def step_back(state, inputs):
                d_h, d_c, _ = state
                d_h_out, (i, f, g, o), c, c_prev = inputs
                tanh_c = tf.tanh(c)
                d_h = d_h + d_h_out
                d_c = d_c + d_h * o * (1.0 - tanh_c * tanh_c)
                d_z = tf.concat([d_c * g * i * (1.0 - i), d_c * c_prev * f * (1.0 - f),
                                 d_c * i * (1.0 - g * g), d_h * tanh_c * o * (1.0 - o)], axis=-1)
                # d_z @ recurrent_kernel^T, computed as (recurrent_kernel @ d_z^T)^T: with a
                # batch-sized d_z, oneDNN's transpose_b matmul measured 4x slower here (31 vs
                # 7.6 ms at 16 x 8192 x 2048), and grappler folds an explicit transpose back.
                d_h = tf.transpose(tf.cast(tf.matmul(kernel, tf.cast(d_z, matmul_dtype), transpose_b=True), d_z.dtype))
                return d_h, d_c * f, d_z

            d_h, d_c, d_gates = tf.scan(step_back, (d_hidden, gates, carries, carries_prev), reverse=True,
                                        initializer=(tf.zeros_like(h0), d_carry, tf.zeros_like(projected[0])))
            h_prev = tf.concat([h0[tf.newaxis], hidden[:-1]], axis=0)
            units = recurrent_kernel.shape[0]
            d_recurrent = _matmul(tf.reshape(h_prev, (-1, units)), tf.reshape(d_gates, (-1, 4 * units)),
                                  matmul_dtype, transpose_a=True)
            return d_gates, d_h[0], d_c[0], d_recurrent

        return (hidden, carries[-1]), backward

    return recurrence(projected, h0, c0, recurrent_kernel)


@serializable()
class FusedLSTM(keras.layers.LSTM):
    """``keras.layers.LSTM`` with the input projection out of the time loop on CPUs.

    Constructor arguments, weights, shapes and results are those of
    ``keras.layers.LSTM`` (input ``(batch, timesteps, features)`` float; output
    ``(batch, units)`` or ``(batch, timesteps, units)`` with ``return_sequences``).
    See the module docstring for when the fused path is taken; elsewhere this is
    exactly ``keras.layers.LSTM``.

    Args:
        matmul_dtype: ``None`` (the layer's compute dtype) or ``"bfloat16"``: the dtype the
            fused path's matmuls read (see the module docstring); weights, states and
            outputs keep the compute dtype.
        **kwargs: ``keras.layers.LSTM``'s arguments.
    """

    def __init__(self, units, matmul_dtype=None, **kwargs):
        super().__init__(units, **kwargs)
        if matmul_dtype not in (None, "bfloat16"):
            raise ValueError(f"matmul_dtype must be None or 'bfloat16'. Received: matmul_dtype={matmul_dtype!r}")
        self.matmul_dtype = matmul_dtype

    def get_config(self):
        return {**super().get_config(), "matmul_dtype": self.matmul_dtype}

    def fused_path_applies(self, sequences, mask, training):
        """True when this call can take the fused CPU path (see the module docstring)."""
        cell = self.cell
        if keras.backend.backend() != "tensorflow":  # Keras' own LSTM (cuDNN on a GPU under JAX too)
            return False
        import tensorflow as tf

        return (not (self.use_cudnn in ("auto", True) and tf.config.list_logical_devices("GPU"))
                and mask is None
                and not (training and (cell.dropout or cell.recurrent_dropout))
                and cell.activation is keras.activations.tanh
                and cell.recurrent_activation is keras.activations.sigmoid
                and not (self.go_backwards or self.stateful or self.unroll))

    def inner_loop(self, sequences, initial_state, mask, training=False):
        if not self.fused_path_applies(sequences, mask, training):
            return super().inner_loop(sequences, initial_state, mask=mask, training=training)
        import tensorflow as tf

        cell = self.cell
        dtype = self.matmul_dtype or sequences.dtype
        # One 2-D matmul (timesteps * batch, input) @ (input, 4 * units), time-major: a 3-D @ 2-D
        # tf.matmul is a broadcasting BatchMatMulV2, whose kernel gradient materialises one
        # (input, 4 * units) product per batch row and then sums them (1 GB at the seed's shapes).
        time_major = tf.transpose(sequences, (1, 0, 2))
        shape = tf.shape(time_major)
        projected = _matmul(tf.reshape(time_major, (-1, sequences.shape[-1])), tf.convert_to_tensor(cell.kernel),
                            dtype)
        projected = tf.reshape(projected, (shape[0], shape[1], 4 * self.units))  # (timesteps, batch, 4 * units)
        if cell.use_bias:
            projected = projected + cell.bias
        hidden, carry = _lstm_recurrence(projected, initial_state[0], initial_state[1],
                                         tf.cast(tf.convert_to_tensor(cell.recurrent_kernel), sequences.dtype), dtype)
        outputs = tf.transpose(hidden, (1, 0, 2))
        return hidden[-1], outputs, [hidden[-1], carry]
