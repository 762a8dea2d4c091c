"""Caption batches for the captioner's three phases: teacher forcing over cached features or
images, bucketed by length (``tf.data`` on TensorFlow, a ``keras.utils.PyDataset`` elsewhere),
and self-critical training's sampled captions with their CIDEr-D advantages."""

import keras
import numpy as np

from helpers import backend, captions, data, features
from helpers.captions import PAD_ID, START_ID
from helpers.decoding import sample_search
from helpers.errors import UsageError

BUCKET_BOUNDARIES = (9, 11, 13, 15, 18, 22)  # token steps; Flickr8k captions are mostly 8-16 words


def bucket_steps(steps, most):
    """The step count that a batch whose longest target has ``steps`` steps is padded to under
    ``CaptionBatches(pad_to_bucket=True)``: its bucket's upper ``BUCKET_BOUNDARIES`` boundary
    minus 1 (below 9: 8; 9-10: 10; ...), at most ``most`` (the caption table's width minus 1,
    also the last bucket's)."""
    bucket = int(np.digitize(steps, BUCKET_BOUNDARIES))
    return min(BUCKET_BOUNDARIES[bucket] - 1 if bucket < len(BUCKET_BOUNDARIES) else most, most)


class CaptionTable:
    """Every caption of a split as word ids, with the image it belongs to.

    Attributes:
        ids: ``(num_captions, max_length + 2)`` int32, ``<start> w1 ... wn <end>`` 0-padded.
        lengths: ``(num_captions,)`` int32 tokens per caption (with ``<start>`` and ``<end>``).
        image: ``(num_captions,)`` int32 index of each caption's image in the split.
        first, count: ``(num_images,)`` int32 index of each image's first caption, and its number.
    """

    def __init__(self, split, vocabulary):
        texts = [text for refs in split.captions for text in refs]
        self.count = np.array([len(refs) for refs in split.captions], np.int32)
        self.first = np.concatenate([[0], np.cumsum(self.count)[:-1]]).astype(np.int32)
        self.image = np.repeat(np.arange(len(split), dtype=np.int32), self.count)
        self.ids, self.lengths = vocabulary.encode(texts)


def _teacher_forcing(ids, length):
    """``(<start> w1 ... wn, w1 ... wn <end>)``: the decoder's input and its targets."""
    return ids[: length - 1], ids[1:length]


def _batched(dataset, batch_size, target_lengths):
    """Batches of captions of similar length (bucketing), each padded to its longest with 0.

    ``target_lengths`` (one per element) give the number of batches, declared to tf.data so that
    Keras knows the epoch's length (``tf.data.experimental.assert_cardinality``).
    """
    import tensorflow as tf

    per_bucket = np.bincount(np.digitize(target_lengths, BUCKET_BOUNDARIES), minlength=len(BUCKET_BOUNDARIES) + 1)
    batches = int(sum(-(-n // batch_size) for n in per_bucket))
    return dataset.bucket_by_sequence_length(
        element_length_func=lambda x, y: tf.shape(y)[0], bucket_boundaries=list(BUCKET_BOUNDARIES),
        bucket_batch_sizes=[batch_size] * (len(BUCKET_BOUNDARIES) + 1)
    ).apply(tf.data.experimental.assert_cardinality(batches)).prefetch(2)


def _tf_data_from(batches, prefetch=2):
    """A ``CaptionBatches`` (or ``SelfCriticalBatches``) of cached features as a ``tf.data.Dataset``
    with free batch and step sizes (``backend.tf_dataset_with_free_shapes``)."""
    import tensorflow as tf

    free = tf.TensorSpec((None, None), tf.int32)
    signature = ((tf.TensorSpec((None, *batches.features.shape[1:]), tf.float32), free), free)
    if isinstance(batches, SelfCriticalBatches):  # and the sample weights
        signature += (tf.TensorSpec((None, None), tf.float32),)
    return backend.tf_dataset_with_free_shapes(batches, signature, prefetch)


def feature_caption_batches(cached, table, batch_size, shuffle=False, seed=0):
    """Phase 1 input: ``((features (batch, 2048) or (batch, positions, 2048) float32, tokens (batch,
    steps) int32), targets (batch, steps) int32)`` for every caption (an epoch sees each caption
    once), from cached features (float32, or a float16 grid), bucketed by length: ``tf.data``
    for pooled features on the TensorFlow backend, else a ``CaptionBatches``."""
    if not backend.is_tensorflow():
        return CaptionBatches(table, batch_size, shuffle, seed, features=cached)
    import tensorflow as tf

    if cached.ndim > 2:  # a feature grid stays in numpy (gathered per batch), read through tf.data
        return _tf_data_from(CaptionBatches(table, batch_size, shuffle, seed, features=cached))

    cached = tf.constant(cached)
    dataset = tf.data.Dataset.from_tensor_slices((table.image, table.ids, table.lengths))
    if shuffle:
        dataset = dataset.shuffle(len(table.image), seed=seed, reshuffle_each_iteration=True)

    def pair(image, ids, length):
        tokens, targets = _teacher_forcing(ids, length)
        return (tf.gather(cached, image), tokens), targets

    return _batched(dataset.map(pair, num_parallel_calls=tf.data.AUTOTUNE), batch_size, table.lengths - 1)


def image_caption_batches(split, table, image_size, batch_size, shuffle=False, seed=0, workers=None):
    """Phase 2 input: ``((images (batch, size, size, 3) float32 0..255, tokens), targets)``, each image
    once per epoch with one of its captions: a random one in training, a fixed one otherwise;
    ``tf.data`` (``workers`` parallel reads, default ``AUTOTUNE``) on the TensorFlow backend, a
    ``CaptionBatches`` (``workers`` threads, default 2) on the others."""
    if not backend.is_tensorflow():
        return CaptionBatches(table, batch_size, shuffle, seed, paths=split.paths, image_size=image_size,
                              workers=workers or 2)
    import tensorflow as tf

    workers = workers or tf.data.AUTOTUNE
    ids, lengths = tf.constant(table.ids), tf.constant(table.lengths)
    dataset = tf.data.Dataset.from_tensor_slices(([str(p) for p in split.paths], table.first, table.count))
    if shuffle:
        dataset = dataset.shuffle(len(split), seed=seed, reshuffle_each_iteration=True)

    def pair(path, first, count):
        pick = first + (tf.random.uniform([], 0, count, dtype=tf.int32) if shuffle else 0)
        tokens, targets = _teacher_forcing(ids[pick], lengths[pick])
        return (features.tf_read_rgb(path, image_size), tokens), targets

    # Training picks a random caption per image: its length, and so its bucket, is known only then.
    if shuffle:
        return dataset.map(pair, num_parallel_calls=workers).padded_batch(batch_size).prefetch(2)
    return _batched(dataset.map(pair, num_parallel_calls=workers), batch_size, table.lengths[table.first] - 1)


class CaptionBatches(keras.utils.PyDataset):
    """``feature_caption_batches`` and ``image_caption_batches`` as a ``keras.utils.PyDataset``: the
    same examples, bucketing and padding (the backends other than TensorFlow, and feature grids).

    With ``features`` (phase 1) an epoch holds every caption with its image's cached features;
    with ``paths`` (phase 2) every image once, with a random caption drawn each epoch when
    ``shuffle``, else its first, read by ``helpers.data.read_rgb``. Captions are grouped by the
    ``BUCKET_BOUNDARIES`` of their target length (not phase 2's shuffled training batches, as in
    the ``tf.data`` path) and each batch is padded with 0 to its longest, or with
    ``pad_to_bucket`` (the default on the backends other than TensorFlow) further, to its bucket's
    boundary (``bucket_steps``): there every new batch shape is a new XLA compilation of the
    train step, so the step counts are bounded to ``len(BUCKET_BOUNDARIES) + 1`` (TensorFlow's
    ``tf.function`` relaxes the step dimension instead). The padding is masked: the loss is the
    same. ``shuffle`` reshuffles the examples and the batches every epoch
    (``numpy.random.default_rng(seed)``).

    A feature grid (``features`` of 3 dimensions, the attention decoder's) is batched by image:
    each batch holds ``max(1, batch_size // C)`` images once and all of their captions, ``C``
    per image (the most any image has; an image with fewer gets empty, fully padded rows),
    image-major, so the decoder attends over each grid once for its ``C`` captions. Images are
    bucketed by their longest caption.

    Batches: ``((features (batch, 2048) float32 | grids (images, positions, 2048) float32 |
    images (batch, size, size, 3) float32 0..255, tokens (batch, steps) int32), targets
    (batch, steps) int32)``.
    """

    def __init__(self, table, batch_size, shuffle=False, seed=0, features=None, paths=None, image_size=None,
                 workers=1, pad_to_bucket=None):
        super().__init__(workers=workers)
        self.table, self.batch_size, self.shuffle = table, batch_size, shuffle
        self.pad_to_bucket = not backend.is_tensorflow() if pad_to_bucket is None else pad_to_bucket
        self.features, self.paths, self.image_size = features, paths, image_size
        self.grid = features is not None and features.ndim == 3
        self.per_image = int(table.count.max())
        self.seed, self.rng = seed, np.random.default_rng(seed)
        self.batches = self._plan(self.rng)

    @property
    def plan_batch_size(self):
        """Rows of a whole batch: images for a feature grid, else captions
        (``helpers.distribute.ProcessSlices``)."""
        return max(1, self.batch_size // self.per_image) if self.grid else self.batch_size

    def plan_epoch(self, epoch):
        """Epoch ``epoch``'s batches (arrays of rows, as ``load_part`` takes them), drawn from
        ``numpy.random.default_rng([seed, epoch])``: the same in every process
        (``helpers.distribute.ProcessSlices``)."""
        return self._plan(np.random.default_rng([self.seed or 0, epoch]))

    def _plan(self, rng):
        table, batch_size = self.table, self.plan_batch_size
        if self.grid:  # each image once; its bucket is its longest caption's
            rows = np.arange(len(table.first))
            lengths = np.maximum.reduceat(table.lengths, table.first) - 1
        elif self.features is not None:  # every caption
            rows = np.arange(len(table.image))
        else:  # each image once, with one caption
            rows = table.first + (rng.integers(0, table.count) if self.shuffle else 0)
        if not self.grid:
            lengths = table.lengths[rows] - 1
        if self.shuffle:
            order = rng.permutation(len(rows))
            rows, lengths = rows[order], lengths[order]
        if self.shuffle and self.features is None:
            groups = [rows]
        else:
            buckets = np.digitize(lengths, BUCKET_BOUNDARIES)
            groups = [rows[buckets == bucket] for bucket in range(len(BUCKET_BOUNDARIES) + 1)]
        batches = [group[i:i + batch_size] for group in groups for i in range(0, len(group), batch_size)]
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, index):
        return self.load_part(self.batches[index])

    def load_part(self, rows, part=slice(None)):
        """The batch of ``rows`` (a batch of the plan), or its part ``part`` (a ``slice`` of ``rows``:
        one process's, ``helpers.distribute.ProcessSlices``), padded as the whole batch is."""
        table = self.table
        images = rows if self.grid else table.image[rows]
        if self.grid:  # all captions of each image, C per image, -1 where an image has fewer
            offsets = np.arange(self.per_image)
            rows = np.where(offsets[None, :] < table.count[images, None], table.first[images, None] + offsets, -1)
            rows = rows.reshape(-1)
        lengths = np.where(rows >= 0, table.lengths[rows] - 1, 0)  # teacher forcing: <start> w1 ... wn -> w1 ... <end>
        steps = int(lengths.max())  # of the whole batch: every part has the same shape
        if self.pad_to_bucket:
            steps = bucket_steps(steps, table.ids.shape[1] - 1)
        images = images[part]
        if self.grid:  # the part's images, each with its C captions
            per_image = self.per_image
            part = slice(None if part.start is None else part.start * per_image,
                         None if part.stop is None else part.stop * per_image)
        rows, lengths = rows[part], lengths[part]
        tokens = table.ids[rows, :steps].copy()
        targets = table.ids[rows, 1:steps + 1].copy()
        tokens[np.arange(steps)[None, :] >= lengths[:, None]] = PAD_ID  # the <end> of a shorter caption
        targets[rows < 0] = PAD_ID
        if self.features is not None:
            first = np.asarray(self.features[images], np.float32)
        else:
            first = np.stack([data.read_rgb(self.paths[i], self.image_size) for i in images])
        return (first, tokens), targets

    def on_epoch_end(self):
        if self.shuffle:
            self.batches = self._plan(self.rng)


class SelfCriticalBatches(keras.utils.PyDataset):
    """Self-critical sequence training's batches (Rennie et al., CVPR 2017), drawn from the
    decoder as it trains: for each image ``samples`` captions sampled word by word
    (``sample_search``), each rewarded by its CIDEr-D against the image's references
    (``helpers.captions.CiderD``, the training references' document frequencies), with the
    mean reward of the image's other samples as the baseline (Luo 2020, "A better variant of
    self-critical sequence training"; no greedy decoding needed). A batch is the sampled
    captions under teacher forcing with their advantage, reward minus baseline, as the sample
    weight of every word: the cross-entropy loss weighted so is the policy gradient's
    surrogate, ``-(r - b) log p(caption)``, so ``model.fit`` trains it with the decoder's
    compiled train step.

    Args:
        decoder: a ``StepDecoder`` of the captioner being trained (it reads its current weights).
        features: ``(num_images, 2048)`` float32 pooled features, or ``(num_images, positions,
            2048)`` grids (attention), of the training images, from the captioner's encoder.
        scorer: a ``helpers.captions.CiderD`` of the same images' references, in order.
        vocabulary: the ``helpers.captions.Vocabulary``; its ``max_length`` bounds the samples.
        images_per_batch: images per batch (each with ``samples`` captions).
        samples: captions sampled per image, >= 2 (the baseline is the others' mean).
        seed: the image order's and the sampling's ``numpy.random.default_rng`` seed.
        pad_to_bucket: pad each batch's steps to its ``bucket_steps`` (default: on the backends
            other than TensorFlow, as ``CaptionBatches``).

    Batches: ``((features (rows, 2048) float32 | grids (images, positions, 2048) float32,
    tokens (rows, steps) int32), targets (rows, steps) int32, weights (rows, steps) float32)``,
    ``rows = images * samples`` image-major; weights 0 on padding. ``rewards`` holds the
    rewards of the captions sampled since it was last emptied.
    """

    def __init__(self, decoder, features, scorer, vocabulary, images_per_batch, samples=5, seed=0,
                 pad_to_bucket=None):
        super().__init__()
        if samples < 2 or images_per_batch < 1:
            raise UsageError(f"self-critical training needs >= 2 samples per image and >= 1 image per batch. "
                             f"Received: samples={samples}, images_per_batch={images_per_batch}")
        self.decoder, self.features, self.scorer, self.vocabulary = decoder, features, scorer, vocabulary
        self.images_per_batch, self.samples = images_per_batch, samples
        self.pad_to_bucket = not backend.is_tensorflow() if pad_to_bucket is None else pad_to_bucket
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(len(features))
        self.rewards = []

    def __len__(self):
        return -(-len(self.features) // self.images_per_batch)

    def __getitem__(self, index):
        images = self.order[index * self.images_per_batch:(index + 1) * self.images_per_batch]
        k, max_length = self.samples, self.vocabulary.max_length + 1  # the words and <end>
        first = np.asarray(self.features[images], np.float32)
        ids = sample_search(self.decoder.step, self.decoder.start(first), len(images), k, max_length, self.rng)
        rows = np.repeat(images, k)
        rewards = self.scorer.scores(rows, [self.vocabulary.decode(caption) for caption in ids])
        self.rewards.extend(rewards.tolist())
        grouped = rewards.reshape(len(images), k)
        advantages = (grouped - (grouped.sum(axis=1, keepdims=True) - grouped) / (k - 1)).reshape(-1)
        lengths = (ids != PAD_ID).sum(axis=1)  # words and <end>: the targets
        steps = int(lengths.max())
        if self.pad_to_bucket:
            steps = bucket_steps(steps, max_length)
        targets = ids[:, :steps]  # 0 after each caption's <end>; steps <= ids' width
        tokens = np.concatenate([np.full((len(rows), 1), START_ID, np.int32), targets[:, :-1]], axis=1)
        tokens[np.arange(steps)[None, :] >= lengths[:, None]] = PAD_ID  # the <end> is a target, not an input
        weights = (advantages[:, None] * (targets != PAD_ID)).astype(np.float32)
        if not self.decoder.attention:  # show-and-tell: each caption with its image's features
            first = np.repeat(first, k, axis=0)
        return (first, tokens), targets, weights

    def on_epoch_end(self):
        self.order = self.rng.permutation(len(self.features))

    def fit_input(self):
        """What ``model.fit`` trains on: on TensorFlow a ``tf.data.Dataset`` over these batches
        without prefetching, elsewhere the ``PyDataset`` itself (one worker: read in step), so
        that every batch is sampled after the previous train step, from the updated decoder."""
        return _tf_data_from(self, prefetch=0) if backend.is_tensorflow() else self


class SelfCriticalValidation(keras.callbacks.Callback):
    """Keeps the sampling decoder current and adds to each epoch's logs, before the checkpoint
    and the CSV log read them, ``val_cider_d``: the CIDEr-D of greedy captions of the
    validation images (the COCO code, as the evaluation), which picks self-critical training's
    best epoch, and ``reward``: the mean CIDEr-D reward of the epoch's sampled training captions.

    On JAX, ``model.fit`` holds the weights in its own state while an epoch runs: after each
    batch this syncs them back (``jax_state_sync``) and gives the sampler a snapshot
    (``StepDecoder.snapshot``), so the next batch is sampled from the decoder just updated.

    Args:
        batches: the ``SelfCriticalBatches`` being trained on.
        features: ``(num_images, ...)`` float32 features of the validation images.
        references: per validation image, its references (``standardize``d, joined by spaces).
    """

    def __init__(self, batches, features, references):
        super().__init__()
        self.batches, self.features, self.references = batches, features, references

    def _sync(self):
        if backend.name() == "jax":
            self.model.jax_state_sync()
        self.batches.decoder.snapshot()

    def on_train_begin(self, logs=None):
        self._sync()

    def on_train_batch_end(self, batch, logs=None):
        self._sync()

    def on_epoch_end(self, epoch, logs=None):
        self._sync()
        if logs is None:
            return
        vocabulary = self.batches.vocabulary
        found = self.batches.decoder.captions(self.features, 1, vocabulary.max_length)
        logs["val_cider_d"] = captions.caption_scores(self.references, [vocabulary.decode(ids) for ids in found],
                                                      meteor=False)["cider_d"]
        logs["reward"] = float(np.mean(self.batches.rewards)) if self.batches.rewards else float("nan")
        self.batches.rewards.clear()
