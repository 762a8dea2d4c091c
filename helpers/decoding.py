"""Decoding a captioner word by word: beam search (greedy as its width 1) and sampling.

``beam_search`` is written once, in ``keras.ops``: ``StepDecoder.captions`` runs it compiled
(a ``tf.function`` on TensorFlow, ``jax.jit`` on JAX, the weights read at each call) for
``captioning.caption()``, the ``caption`` and ``evaluate`` commands and self-critical
training's validation, and ``helpers.export.export_captioner`` traces the same function into
the SavedModel, so a served captioner's captions are ``caption()``'s. ``sample_search`` draws
captions for self-critical training (Rennie et al., CVPR 2017) in numpy, one compiled step at a
time. The LSTM state is carried explicitly between steps (``StepDecoder``).
"""

import keras
import numpy as np
from keras import ops

from helpers import backend
from helpers.attention import SoftAttentionLSTM
from helpers.captions import END_ID, PAD_ID, START_ID, UNK_ID
from helpers.errors import UsageError

FORBIDDEN = (PAD_ID, START_ID, UNK_ID)  # word ids decoding never emits
LENGTH_PENALTY = 1.0  # beam search ranks by total log-probability / words ** LENGTH_PENALTY


def beam_search(start, step, image_features, beam_size, max_length, length_penalty=LENGTH_PENALTY,
                forbidden=FORBIDDEN):
    """Beam search, batched over images, length-normalised (total log-probability /
    words ** ``length_penalty``, ``<end>`` counted); ``beam_size=1`` is greedy decoding.

    Each image keeps ``beam_size`` live hypotheses. A hypothesis that emits ``<end>`` among the
    ``beam_size`` best candidates of its step is set aside as ended (the best ``beam_size``
    ended are kept); an image is done when ``beam_size`` have ended and no live hypothesis
    scores better than the ``beam_size``-th best of them, or after ``max_length`` words. The
    result is the best by normalised score of the ended hypotheses and, at ``max_length``, the
    live ones (so when none ends, the best unfinished one); among equal scores, the first.

    Written in ``keras.ops`` with ``ops.while_loop`` and fixed shapes, so that it runs eagerly,
    under ``jax.jit`` or in a ``tf.function`` (and a SavedModel) alike.

    Args:
        start: ``start(image_features) -> (state, constants)``: tuples of tensors, ``state``
            with one row per image (the LSTM's), ``constants`` per image and kept through the
            search (``StepDecoder.graph_start``).
        step: ``step(tokens (rows,) int32, state, constants) -> (log_probs (rows, vocabulary)
            float32, state)``, rows image-major, ``beam_size`` per image (``StepDecoder.graph_step``).
        image_features: the encoder's output, ``(images, ...)`` float32.
        beam_size: hypotheses kept per image, >= 1.
        max_length: words at most, >= 1; a caption without ``<end>`` by then is returned as it is.
        length_penalty: the exponent of the length normalisation, >= 0: 0 ranks by total
            log-probability (favours short captions), 1 by mean log-probability per word,
            above 1 favours longer captions still.
        forbidden: word ids never emitted (default: padding, ``<start>``, ``<unk>``).

    Returns:
        ``(ids, scores)``: ``(images, max_length)`` int32 word ids of each image's caption,
        ``<end>`` included when it came, 0 after it; ``(images,)`` float32 its normalised
        log-probability. Backend tensors.
    """
    k = beam_size
    negative = float("-inf")
    state, constants = start(image_features)
    batch = ops.shape(image_features)[0]
    state = tuple(ops.take(s, ops.repeat(ops.arange(batch), k), axis=0) for s in state)
    tokens = ops.full((batch * k,), START_ID, "int32")
    scores = ops.concatenate([ops.zeros((batch, 1)), ops.full((batch, k - 1), negative)], axis=1)
    sequences = ops.zeros((batch, k, max_length), "int32")
    ended_scores, ended_sequences = ops.full((batch, k), negative), ops.zeros((batch, k, max_length), "int32")
    done = ops.zeros((batch,), "bool")
    slots, ranks = ops.arange(k, dtype="int32"), ops.arange(2 * k, dtype="int32")
    positions = ops.arange(max_length, dtype="int32")

    def normalised(total, words):
        return total / ops.power(ops.cast(words, "float32"), length_penalty)

    def gather_rows(x, index):
        """``x[b, index[b, j]]`` for ``x`` ``(batch, n, ...)``, ``index`` ``(batch, m)`` int32."""
        flat = ops.reshape(x, (-1, *x.shape[2:]))
        rows = ops.arange(batch, dtype="int32")[:, None] * x.shape[1] + index
        return ops.reshape(ops.take(flat, ops.reshape(rows, (-1,)), axis=0), (-1, index.shape[1], *x.shape[2:]))

    def body(length, tokens, state, scores, sequences, ended_scores, ended_sequences, done):
        log_probs, state = step(tokens, state, constants)
        vocabulary = log_probs.shape[-1]
        banned = np.zeros(vocabulary, bool)
        banned[list(forbidden)] = True
        log_probs = ops.where(banned[None, :], negative, ops.cast(log_probs, "float32"))
        totals = ops.reshape(scores[:, :, None] + ops.reshape(log_probs, (-1, k, vocabulary)), (-1, k * vocabulary))
        totals = ops.where(done[:, None], negative, totals)  # a done image takes no candidate
        values, indices = ops.top_k(totals, 2 * k)  # sorted; equal values: the lower index first
        indices = ops.cast(indices, "int32")
        parents, words = indices // vocabulary, indices % vocabulary
        finite, is_end = ops.isfinite(values), ops.equal(words, END_ID)
        written = ops.cast(ops.equal(positions, length - 1), "int32")  # this step's column
        candidates = gather_rows(sequences, parents) + written[None, None, :] * words[:, :, None]
        # An ending counts among the k best candidates only; the ended keep their k best.
        ending = finite & is_end & (ranks[None, :] < k)
        merged = ops.concatenate([ended_scores, ops.where(ending, normalised(values, length), negative)], axis=1)
        ended_scores, chosen = ops.top_k(merged, k)
        ended_sequences = gather_rows(ops.concatenate([ended_sequences, candidates], axis=1), ops.cast(chosen, "int32"))
        # The first k candidates that do not end are the live hypotheses, in rank order.
        live = finite & ~is_end
        order = ops.cumsum(ops.cast(live, "int32"), axis=1) - 1
        match = (live & (order < k))[:, :, None] & ops.equal(order[:, :, None], slots[None, None, :])
        has = ops.any(match, axis=1)  # (batch, k): slot j filled
        pick = ops.cast(ops.argmax(ops.cast(match, "int32"), axis=1), "int32")  # its candidate
        scores = ops.where(has, ops.take_along_axis(values, pick, axis=1), negative)
        parents = ops.where(has, ops.take_along_axis(parents, pick, axis=1), slots[None, :])
        tokens = ops.reshape(ops.where(has, ops.take_along_axis(words, pick, axis=1), START_ID), (-1,))
        sequences = ops.where(has[:, :, None], gather_rows(candidates, pick), 0)
        # Done once k have ended and no live hypothesis beats the k-th best ending.
        kth = ended_scores[:, k - 1]
        finished = ~done & ops.isfinite(kth) & (normalised(ops.max(scores, axis=1), length) <= kth)
        scores = ops.where(finished[:, None], negative, scores)
        done = done | finished
        rows = ops.reshape(ops.arange(batch, dtype="int32")[:, None] * k + parents, (-1,))
        state = tuple(ops.take(s, rows, axis=0) for s in state)
        return length + 1, tokens, state, scores, sequences, ended_scores, ended_sequences, done

    length, _, _, scores, sequences, ended_scores, ended_sequences, _ = ops.while_loop(
        lambda length, *rest: (length <= max_length) & ~ops.all(rest[-1]), body,
        (ops.convert_to_tensor(1, "int32"), tokens, state, scores, sequences, ended_scores, ended_sequences, done))
    # The best ending, or a live hypothesis cut at max_length if better (the first best on ties).
    best_scores, best = ops.top_k(ops.concatenate([ended_scores, normalised(scores, length - 1)], axis=1), 1)
    ids = gather_rows(ops.concatenate([ended_sequences, sequences], axis=1), ops.cast(best, "int32"))
    return ids[:, 0], best_scores[:, 0]


def caption_words(ids):
    """Per caption the list of word ids ``beam_search`` found: its words, then ``<end>`` when it
    came (the 0 padding after it dropped). ``ids``: ``(captions, max_length)`` integers."""
    found = []
    for row in np.asarray(ops.convert_to_numpy(ids)):
        ends = np.flatnonzero(row == END_ID)
        found.append([int(i) for i in (row[:ends[0] + 1] if len(ends) else row[row != PAD_ID])])
    return found


def _forbid(log_probs):
    """Log-probabilities (numpy, float64) with the ``FORBIDDEN`` words made impossible."""
    log_probs = np.array(log_probs, dtype=np.float64)
    log_probs[:, list(FORBIDDEN)] = -np.inf
    return log_probs


def sample_search(step, state, batch_size, samples, max_length, rng):
    """Random decoding: ``samples`` captions per image, each word drawn from the decoder's
    distribution (self-critical sequence training's exploration; Rennie et al. 2017).

    Args:
        step: ``step(tokens (n,) int32, state) -> (log_probs (n, vocabulary) float, state)``
            in numpy, ``state`` a tuple of arrays with ``n`` rows (``StepDecoder.step``).
        state: the state before the first word (``StepDecoder.start``), one row per image.
        batch_size: images.
        samples: captions drawn per image, >= 1.
        max_length: words at most (``<end>`` counted).
        rng: a ``numpy.random.Generator``.

    Returns:
        ``(batch_size * samples, max_length)`` int32 word ids, image-major (``samples`` rows per
        image), each caption's words then ``<end>`` if it came within ``max_length``, then 0
        (padding). Never a ``FORBIDDEN`` word.
    """
    rows = batch_size * samples
    state = tuple(np.repeat(np.asarray(s), samples, axis=0) for s in state)
    tokens = np.full(rows, START_ID, np.int32)
    ids = np.zeros((rows, max_length), np.int32)
    done = np.zeros(rows, bool)
    for position in range(max_length):
        log_probs, state = step(tokens, state)
        log_probs = _forbid(log_probs)
        probabilities = np.exp(log_probs - log_probs.max(axis=1, keepdims=True))
        cumulative = np.cumsum(probabilities, axis=1)
        drawn = (cumulative < (1.0 - rng.random(rows))[:, None] * cumulative[:, -1:]).sum(axis=1)  # u in (0, 1]
        tokens = np.where(done, PAD_ID, np.minimum(drawn, log_probs.shape[1] - 1)).astype(np.int32)
        ids[:, position] = tokens
        done |= tokens == END_ID
        if done.all():
            break
    return ids


def _jit_with_weights(function, variables, held):
    """``jax.jit(function)`` reading the weights at each call, passed as arguments
    (``keras.StatelessScope``): ``held()`` (a snapshot) when it is not ``None``, else
    ``variables``' current values. Jitted on its own, a function would keep the values it was
    traced with as constants, and go on decoding with them while the model trains
    (self-critical training samples from the decoder it updates)."""
    import jax

    def stateless(values, *args):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return function(*args)

    jitted = jax.jit(stateless)
    return lambda *args: jitted(held() or [variable.value for variable in variables], *args)


class StepDecoder:
    """Step-by-step decoding with a trained captioner's layers, the LSTM state carried explicitly.

    For the attention decoder the state is ``(h, c)`` and each image's annotations and
    attention keys are constants of the search (``graph_start``; ``start`` keeps them on the
    decoder): rows of the state are image-major (``C`` rows per image: 1 greedy, ``beam_size``
    in beam search, ``samples`` in sampling). For show-and-tell it is ``(h, c, image)``.

    Args:
        model: a captioner from ``captioning.build_captioner`` (trained or loaded).
    """

    def __init__(self, model):
        self.encoder = model.get_layer("encoder")
        decoder = model.get_layer("decoder")
        names = {layer.name for layer in decoder.layers}
        self.lstm = decoder.get_layer("lstm")
        self.attention = isinstance(self.lstm, SoftAttentionLSTM)
        self.pre_inject = "prepend_image" in names
        self.embedding = decoder.get_layer("word_embedding")
        self.head = decoder.get_layer("next_word")
        if self.attention:
            self.annotations = decoder.get_layer("annotations")
            self.deep_hidden, self.deep_context = decoder.get_layer("deep_hidden"), decoder.get_layer("deep_context")
            start, step = self._attention_start, self._attention_step
        else:
            self.image_embedding = decoder.get_layer("image_embedding")
            self.merge = decoder.get_layer("merge_dense") if "merge_dense" in names else None
            start, step = self._start, self._step
        self._constants = ()
        self._feature_shape = tuple(self.encoder.output_shape[1:])
        if backend.is_tensorflow():  # one traced graph per call shape, not op by op
            import tensorflow as tf

            matrix, grid = tf.TensorSpec((None, None), tf.float32), tf.TensorSpec((None, None, None), tf.float32)
            ids = tf.TensorSpec((None,), tf.int32)
            start_signature = [grid if self.attention else matrix]
            step_signature = [ids, matrix, matrix] + ([grid, grid] if self.attention else [matrix])
            start = tf.function(start, input_signature=start_signature, autograph=False)
            step = tf.function(step, input_signature=step_signature, autograph=False)
        self._variables, self._held = decoder.variables, None
        if backend.name() == "jax":  # compiled once per batch shape, the weights as arguments
            start, step = (_jit_with_weights(f, self._variables, lambda: self._held) for f in (start, step))
        self._start_fn, self._step_fn = start, step
        self._searches = {}

    def _start(self, image_features):
        image = self.image_embedding(image_features)
        if self.pre_inject:
            _, h, c = self.lstm(ops.expand_dims(image, 1))
        else:
            h = c = ops.zeros((ops.shape(image)[0], self.lstm.units))
        return h, c, image

    def _step(self, tokens, h, c, image):
        outputs, h, c = self.lstm(self.embedding(ops.expand_dims(tokens, 1)), initial_state=[h, c])
        outputs = outputs[:, 0]
        if self.merge is not None:
            outputs = self.merge(outputs + image)
        return ops.log(ops.maximum(self.head(outputs), 1e-30)), h, c

    def _attention_start(self, grid):
        annotations = self.annotations(grid)
        h, c, keys = self.lstm.initial_state(annotations)
        return h, c, annotations, keys

    def _attention_step(self, tokens, h, c, annotations, keys):
        words = self.embedding(tokens)
        h, c, z, alpha = self.lstm.step(words, h, c, annotations, keys)
        probabilities = self.head(words + self.deep_hidden(h) + self.deep_context(z))
        return ops.log(ops.maximum(probabilities, 1e-30)), h, c, alpha

    def snapshot(self):
        """Decodes from now on with the decoder's weights as they are now, even once a JAX
        ``model.fit`` has taken them off its variables (it keeps them in its own state between
        epochs: call its ``jax_state_sync()`` first). A no-op on the other backends, whose
        variables always hold the current weights."""
        if backend.name() == "jax":
            self._held = [variable.value for variable in self._variables]

    def graph_start(self, image_features):
        """``beam_search``'s ``start`` in backend tensors, traceable: ``(state, constants)``
        tuples (the attention decoder's per-image annotations and keys are its constants;
        show-and-tell has none)."""
        if self.attention:
            h, c, annotations, keys = self._attention_start(image_features)
            return (h, c), (annotations, keys)
        return tuple(self._start(image_features)), ()

    def graph_step(self, tokens, state, constants):
        """``beam_search``'s ``step`` in backend tensors, traceable: ``(log_probs, state)``."""
        if self.attention:
            log_probs, h, c, _ = self._attention_step(tokens, *state, *constants)
            return log_probs, (h, c)
        log_probs, h, c = self._step(tokens, *state)
        return log_probs, (h, c, state[2])

    def start(self, image_features):
        """``sample_search``'s state after the image, numpy arrays with one row per image:
        ``(h, c)`` (the attention decoder's annotations and keys are kept for the following
        steps), or ``(h, c, image embedding)``."""
        out = self._start_fn(ops.convert_to_tensor(image_features, "float32"))
        if self.attention:
            self._constants = out[2:]
            out = out[:2]
        return tuple(ops.convert_to_numpy(t) for t in out)

    def step(self, tokens, state):
        """``sample_search``'s ``step``, numpy in and out."""
        tensors = [ops.convert_to_tensor(tokens, "int32")] + [ops.convert_to_tensor(s, "float32") for s in state[:2]]
        if self.attention:
            log_probs, h, c, _ = self._step_fn(*tensors, *self._constants)
            return ops.convert_to_numpy(log_probs), (ops.convert_to_numpy(h), ops.convert_to_numpy(c))
        log_probs, h, c = self._step_fn(*tensors, ops.convert_to_tensor(state[2], "float32"))
        return ops.convert_to_numpy(log_probs), (ops.convert_to_numpy(h), ops.convert_to_numpy(c), state[2])

    def _search(self, beam_size, max_length):
        """``beam_search`` with this decoder, compiled once per width and length: a
        ``tf.function`` with a free batch size on TensorFlow, ``jax.jit`` (once per batch
        shape, the weights as arguments) on JAX, eager elsewhere."""
        key = (beam_size, max_length)
        if key not in self._searches:
            def search(image_features):
                return beam_search(self.graph_start, self.graph_step, image_features, beam_size, max_length)[0]

            if backend.is_tensorflow():
                import tensorflow as tf

                free = (None,) * (len(self._feature_shape) - 1)  # an attention grid's positions too
                signature = [tf.TensorSpec((None, *free, self._feature_shape[-1]), tf.float32)]
                search = tf.function(search, input_signature=signature, autograph=False)
            elif backend.name() == "jax":
                search = _jit_with_weights(search, self._variables, lambda: self._held)
            self._searches[key] = search
        return self._searches[key]

    def captions(self, image_features, beam_size, max_length, batch_size=64):
        """Word ids of each image's caption by ``beam_search`` (greedy for ``beam_size`` 1).

        Args:
            image_features: ``(num_images, 2048)`` or, for attention, ``(num_images, positions,
                2048)`` float32 from the model's encoder.
            beam_size: hypotheses kept per image, >= 1.
            max_length: words at most.
            batch_size: images searched together. On JAX a smaller last batch is padded to a
                power of two, so that few batch shapes are compiled.

        Returns:
            Per image the list of word ids: the words, then ``<end>`` when it came.
        """
        search, found = self._search(beam_size, max_length), []
        image_features = np.asarray(image_features, np.float32)
        for first in range(0, len(image_features), batch_size):
            chunk = image_features[first:first + batch_size]
            rows = len(chunk)
            if backend.name() == "jax" and rows < batch_size:
                padded = min(batch_size, 1 << (rows - 1).bit_length())
                chunk = np.concatenate([chunk, np.zeros((padded - rows, *chunk.shape[1:]), np.float32)])
            found += caption_words(search(ops.convert_to_tensor(chunk)))[:rows]
        return found

    def attention_weights(self, image_features, ids):
        """Where the attention decoder looked for each word of given captions.

        Args:
            image_features: ``(num_images, positions, 2048)`` float32 grids from the encoder.
            ids: per image, the caption's word ids (``captions``' output; ``<end>`` may close it).

        Returns:
            Per image a ``(words, positions)`` float32 array, rows summing to 1: the weights the
            decoder gave each grid position while it produced each word (not ``<end>``). The
            same as during decoding: the caption's own words are fed back (teacher forcing).

        Raises:
            helpers.errors.UsageError: the model's decoder has no attention.
        """
        if not self.attention:
            raise UsageError("attention maps need a captioner trained with --decoder attention.")
        words = [[int(i) for i in caption if int(i) != END_ID] for caption in ids]
        steps = max(1, max(len(w) for w in words))
        tokens = np.zeros((len(words), steps), np.int32)
        for row, caption in enumerate(words):
            tokens[row, :len(caption)] = [START_ID] + caption[:-1] if caption else []
        _, _, alphas = self.lstm([self.embedding(ops.convert_to_tensor(tokens)),
                                  self.annotations(ops.convert_to_tensor(image_features, "float32"))])
        alphas = ops.convert_to_numpy(alphas)
        return [alphas[row, :len(caption)] for row, caption in enumerate(words)]
