"""Captioned images: the Flickr8k and COCO captions formats, caption text, the vocabulary
and the caption metrics.

Two layouts are read (``load_caption_splits``)::

    Flickr8k (Hodosh et al. 2013), as distributed and as keras-io's captioning example downloads it:
    DATA/Flickr8k.token.txt            <image>#<n><TAB><caption>, five per image
    DATA/Flickr_8k.trainImages.txt     the official split: 6,000 / 1,000 / 1,000 image names
    DATA/Flickr_8k.devImages.txt
    DATA/Flickr_8k.testImages.txt
    DATA/Flicker8k_Dataset/*.jpg       (or Flickr8k_Dataset/, Images/, images/)

    COCO captions format (``captions_<name>.json``: ``images`` [{id, file_name}], ``annotations``
    [{image_id, caption}]), in DATA/ or DATA/annotations/:
    DATA/annotations/captions_train2017.json  + DATA/train2017/  (or DATA/images/)
    DATA/annotations/captions_val2017.json    + DATA/val2017/
    DATA/annotations/captions_test*.json      optional

The split is the dataset's: ``train`` trains, ``val`` (Flickr8k's dev) chooses checkpoints,
``test`` is reported. There is never a random split. Bad input (a caption line without a tab
or an image name, an image listed but missing, an empty split, a JSON without
``annotations``, a caption that is not text or has no word, an image listed twice or in two
splits) raises ``DatasetError`` naming the file and line before anything trains.

Text: lowercase, punctuation removed (what Keras' ``TextVectorization`` does by default,
``lower_and_strip_punctuation``), split on whitespace; word ids are positions in the saved
vocabulary (as ``keras.layers.StringLookup`` numbers them). Plain Python, so it runs on every
backend without TensorFlow's string ops.
"""

import collections
import dataclasses
import functools
import json
import logging
import math
import re
import shutil
import subprocess
from pathlib import Path

from helpers import rundir
from helpers.data import DatasetError
from helpers.errors import UsageError
from helpers.formats import read_text

logger = logging.getLogger(__name__)

FLICKR8K_TOKENS = "Flickr8k.token.txt"
FLICKR8K_SPLITS = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
                   "test": "Flickr_8k.testImages.txt"}
FLICKR8K_IMAGE_FOLDERS = ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images", "images")
# The archives keras-io's examples/vision/image_captioning.py downloads.
FLICKR8K_URLS = {"Flickr8k_Dataset.zip": "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/"
                 "Flickr8k_Dataset.zip",
                 "Flickr8k_text.zip": "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/"
                 "Flickr8k_text.zip"}

PAD, UNK, START, END = "", "<unk>", "<start>", "<end>"
SPECIAL_TOKENS = (PAD, UNK, START, END)  # ids 0, 1, 2, 3
PAD_ID, UNK_ID, START_ID, END_ID = range(4)
# keras.layers.TextVectorization's "lower_and_strip_punctuation" removes these characters.
PUNCTUATION = r'[!"#$%&()\*\+,-\./:;<=>?@\[\\\]^_`{|}~\']'


@dataclasses.dataclass
class CaptionSplit:
    """One split of a captioned dataset.

    Attributes:
        name: ``"train"``, ``"val"`` or ``"test"``.
        paths: image paths, one per image.
        captions: each image's reference captions (raw text, at least one).
        source: the file the split was read from (named in messages).
        places: where each image is listed (``"Flickr_8k.trainImages.txt:12"``), for messages.
    """

    name: str
    paths: list
    captions: list
    source: Path
    places: list = dataclasses.field(default_factory=list)

    def __len__(self):
        return len(self.paths)


def _flickr8k_images_folder(data_dir):
    for name in FLICKR8K_IMAGE_FOLDERS:
        if (data_dir / name).is_dir():
            return data_dir / name
    raise DatasetError(f"{data_dir} has {FLICKR8K_TOKENS} but no images folder ({', '.join(FLICKR8K_IMAGE_FOLDERS)}).")


def read_flickr8k_tokens(path):
    """Reads ``Flickr8k.token.txt``: ``{image name: [(caption, "file:line"), ...]}`` in file order, the
    captions not yet checked: a split's loader checks (``check_caption``) only those of the images it
    lists, so a bad caption of another split does not stop it.

    Raises:
        DatasetError: a line without a tab or without an image name (the file and line are named).
    """
    captions = collections.defaultdict(list)
    for number, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise DatasetError(f"{path}:{number}: no tab between the image name and the caption: {line[:80]!r}")
        key, caption = line.split("\t", 1)
        image = key.rsplit("#", 1)[0].strip() if "#" in key else key.strip()
        if not image:
            raise DatasetError(f"{path}:{number}: no image name before the tab: {line[:80]!r}")
        captions[image].append((caption, f"{path}:{number}"))
    return dict(captions)


def check_caption(caption, place):
    """A reference caption as text, stripped; ``place`` (``file:line``) names it in the error.

    Raises:
        DatasetError: the caption is not a string (a number, a list in a JSON file) or has no
            word once standardised (empty, or punctuation only): it would be an empty reference.
    """
    if not isinstance(caption, str):
        raise DatasetError(f"{place}: the caption is a {type(caption).__name__} ({str(caption)[:60]!r}), not text")
    if not standardize(caption).split():
        raise DatasetError(f"{place}: the caption {caption[:60]!r} has no word once lowercased and stripped of "
                           "punctuation")
    return caption.strip()


def _listed_once(splits):
    """Refuses an image listed twice in one split or in two splits (the test scores would then
    measure memory), naming it and both places.

    Raises:
        DatasetError: ``<image> is listed twice: <place> and <place>``.
    """
    seen = {}
    for split in splits.values():
        for path, place in zip(split.paths, split.places):
            key = Path(path).resolve()
            if key in seen:
                where = "twice in the " + split.name + " split" if seen[key][0] == split.name else \
                    f"in the {seen[key][0]} and the {split.name} splits"
                raise DatasetError(f"{path} is listed {where}: {seen[key][1]} and {place}; each image belongs to "
                                   "one split, once.")
            seen[key] = (split.name, place)
    return splits


def _flickr8k_splits(data_dir, only=None):
    tokens = read_flickr8k_tokens(data_dir / FLICKR8K_TOKENS)
    images = _flickr8k_images_folder(data_dir)
    splits = {}
    for name, file_name in FLICKR8K_SPLITS.items():
        if only is not None and name not in only:
            continue
        path = data_dir / file_name
        if not path.is_file():
            raise DatasetError(f"{data_dir} has {FLICKR8K_TOKENS} but not the split file {file_name}.")
        paths, captions, places = [], [], []
        for number, line in enumerate(read_text(path).splitlines(), 1):
            image = line.strip()
            if not image:
                continue
            if image not in tokens:
                raise DatasetError(f"{path}:{number}: image {image} has no caption in {FLICKR8K_TOKENS}")
            if not (images / image).is_file():
                raise DatasetError(f"{path}:{number}: image {image} is listed but not in {images}")
            paths.append(images / image)
            captions.append([check_caption(caption, place) for caption, place in tokens[image]])
            places.append(f"{path}:{number}")
        if not paths:
            raise DatasetError(f"{path}: the {name} split is empty")
        splits[name] = CaptionSplit(name, paths, captions, path, places)
    return _listed_once(splits)


def _coco_split_name(path):
    suffix = path.stem[len("captions_"):].lower()
    return next((name for key, name in (("train", "train"), ("val", "val"), ("dev", "val"), ("test", "test"))
                 if suffix.startswith(key)), None)


def read_coco_captions(path, data_dir):
    """Reads one COCO captions file into a ``CaptionSplit`` (images without captions left out).

    The images are in ``DATA/<suffix>/`` for ``captions_<suffix>.json`` (``train2017``), else in
    ``DATA/images/``.

    Raises:
        DatasetError: not JSON, no ``images`` or ``annotations`` list, an annotation of an
            unknown image or without a caption, an image file missing, no captioned image.
    """
    try:
        content = json.loads(read_text(path))
    except json.JSONDecodeError as error:
        raise DatasetError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
    for key in ("images", "annotations"):
        if not isinstance(content, dict) or not isinstance(content.get(key), list):
            raise DatasetError(f"{path}: no {key!r} list; a COCO captions file has 'images' and 'annotations'")
    suffix = path.stem[len("captions_"):]
    folder = data_dir / suffix if (data_dir / suffix).is_dir() else data_dir / "images"
    files, where = {}, {}
    for number, image in enumerate(content["images"]):
        if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str) \
                or not image["file_name"]:
            raise DatasetError(f"{path}: images[{number}] has no 'id' and 'file_name'")
        if image["id"] in files:
            raise DatasetError(f"{path}: images[{number}] repeats the id {image['id']!r} of "
                               f"images[{where[image['id']]}]")
        files[image["id"]], where[image["id"]] = image["file_name"], number
    captions = collections.defaultdict(list)
    for number, annotation in enumerate(content["annotations"]):
        if not isinstance(annotation, dict) or annotation.get("image_id") not in files:
            raise DatasetError(f"{path}: annotations[{number}] names no image of 'images' "
                               f"(image_id {annotation.get('image_id') if isinstance(annotation, dict) else None!r})")
        if annotation.get("caption") is None:
            raise DatasetError(f"{path}: annotations[{number}] has no caption")
        captions[annotation["image_id"]].append(check_caption(annotation["caption"], f"{path}: annotations[{number}]"))
    paths, texts, places = [], [], []
    uncaptioned = [file_name for image_id, file_name in files.items() if image_id not in captions]
    if uncaptioned:
        logger.warning("%s: %d images without a caption left out (%s%s)", path, len(uncaptioned),
                       ", ".join(uncaptioned[:3]), ", ..." if len(uncaptioned) > 3 else "")
    for image_id, file_name in files.items():
        if image_id not in captions:
            continue
        if not (folder / file_name).is_file():
            raise DatasetError(f"{path}: image {file_name} is listed but not in {folder}")
        paths.append(folder / file_name)
        texts.append(captions[image_id])
        places.append(f"{path}: images[{where[image_id]}]")
    name = _coco_split_name(path)
    if not paths:
        raise DatasetError(f"{path}: the {name} split has no captioned image")
    return CaptionSplit(name, paths, texts, path, places)


def load_caption_splits(data_dir, only=None):
    """The ``train``, ``val`` and (when present) ``test`` splits of a Flickr8k or COCO-format folder.

    Args:
        data_dir: the dataset folder.
        only: the split names to read (``evaluate`` reads one: a bad caption of another split does
            not stop it); default: all, ``train`` and ``val`` required.

    Raises:
        DatasetError: the folder is missing or in neither layout, or any file read is bad (named).
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DatasetError(f"Data directory {data_dir} does not exist.")
    if (data_dir / FLICKR8K_TOKENS).is_file():
        return _flickr8k_splits(data_dir, only)
    files = sorted(data_dir.glob("captions_*.json")) + sorted((data_dir / "annotations").glob("captions_*.json"))
    if not files:
        raise DatasetError(f"{data_dir} is neither Flickr8k ({FLICKR8K_TOKENS}, the Flickr_8k.*Images.txt split "
                           "files and an images folder) nor COCO captions (captions_<split>.json in it or in "
                           "annotations/, with the images).")
    splits = {}
    for path in files:
        name = _coco_split_name(path)
        if name is None:
            logger.info("%s: not a train/val/test captions file; ignored", path)
            continue
        if only is not None and name not in only:
            continue
        if name in splits:
            raise DatasetError(f"{data_dir}: two {name} captions files ({splits[name].source.name}, {path.name})")
        splits[name] = read_coco_captions(path, data_dir)
    for name in ("train", "val") if only is None else ():
        if name not in splits:
            raise DatasetError(f"{data_dir}: no captions_{name}*.json (COCO format needs a train and a val file)")
    return _listed_once(splits)


def download_flickr8k(cache_dir=None):
    """Downloads and extracts Flickr8k (images and text) with ``keras.utils.get_file``, once; returns its folder.

    Raises:
        DatasetError: the download failed (no internet); the message names the offline option.
    """
    import keras

    folder = None
    for file_name, url in FLICKR8K_URLS.items():
        try:
            path = keras.utils.get_file(file_name, url, extract=True, cache_dir=cache_dir,
                                        cache_subdir="datasets/flickr8k")
        except Exception as error:  # URLError, HTTPError, OSError...
            raise DatasetError(f"Could not download {url} ({type(error).__name__}: {str(error)[:200]}). Offline: "
                               "copy Flickr8k (the images folder, Flickr8k.token.txt and the Flickr_8k.*Images.txt "
                               "split files) into one folder and pass it as --data-dir.") from error
        folder = Path(path).parent
    found = next((p.parent for p in folder.rglob(FLICKR8K_TOKENS)), None)
    if found is None:
        raise DatasetError(f"The Flickr8k download in {folder} holds no {FLICKR8K_TOKENS}.")
    for images in folder.rglob("Flicker8k_Dataset"):  # link the images beside the text files
        if images.is_dir() and not (found / images.name).exists():
            (found / images.name).symlink_to(images.resolve(), target_is_directory=True)
    return found


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def standardize(text):
    """One text as Keras' ``TextVectorization`` standardises it by default
    (``"lower_and_strip_punctuation"``: ``tf.strings.lower``, which lowers ASCII letters only, then
    ``PUNCTUATION`` removed), in plain Python on every backend (tested equal to Keras' on TensorFlow)."""
    return re.sub(PUNCTUATION, "", text.translate(_ASCII_LOWER))


def tokenize(texts):
    """Each text's words after ``standardize``, split on whitespace: a list of lists of ``str``."""
    return [standardize(text).split() for text in texts]


MAX_LENGTH = 200  # words per caption at most (Flickr8k's longest caption has 38)


def reference_texts(captions):
    """Per image, its captions as the metrics compare them: ``standardize``d words joined by spaces.

    Args:
        captions: per image, a list of caption strings (``CaptionSplit.captions``).
    """
    return [[" ".join(words) for words in tokenize(refs)] for refs in captions]


def check_text_arguments(min_word_count, max_length):
    """Raises ``UsageError`` (a ``ValueError``) echoing a text argument that cannot work:
    ``min_word_count`` >= 1, ``max_length`` in [1, ``MAX_LENGTH``]."""
    if min_word_count < 1:
        raise UsageError(f"min_word_count must be at least 1. Received: min_word_count={min_word_count}")
    if not 1 <= max_length <= MAX_LENGTH:
        raise UsageError(f"max_length must be in [1, {MAX_LENGTH}] words per caption. Received: max_length={max_length}")


class Vocabulary:
    """The caption vocabulary: ``tokens[i]`` is word id ``i``; ids 0..3 are padding (``""``),
    ``<unk>``, ``<start>`` and ``<end>``.

    Args:
        tokens: every token in id order, beginning with ``SPECIAL_TOKENS``.
        max_length: longest caption in words (longer ones are cut; decoding stops there).

    Raises:
        UsageError: the tokens do not begin with ``SPECIAL_TOKENS``, repeat, or ``max_length`` < 1.
    """

    def __init__(self, tokens, max_length):
        tokens = list(tokens)
        if tuple(tokens[:4]) != SPECIAL_TOKENS or len(set(tokens)) != len(tokens):
            raise UsageError(f"A vocabulary begins with {SPECIAL_TOKENS} and has no repeated token. "
                             f"Received: {tokens[:6]}...")
        check_text_arguments(1, max_length)
        self.tokens, self.max_length = tokens, int(max_length)
        self.ids = {token: index for index, token in enumerate(tokens)}

    @classmethod
    def from_captions(cls, captions, min_word_count=5, max_length=30):
        """Counts words over ``captions`` (the training captions only) and keeps those seen at
        least ``min_word_count`` times, most frequent first (ties alphabetical)."""
        check_text_arguments(min_word_count, max_length)
        counts = collections.Counter(word for words in tokenize(captions) for word in words)
        kept = sorted((word for word, n in counts.items() if n >= min_word_count and word not in SPECIAL_TOKENS),
                      key=lambda word: (-counts[word], word))
        return cls(list(SPECIAL_TOKENS) + kept, max_length)

    def __len__(self):
        return len(self.tokens)

    def save(self, path, **extra):
        """Writes ``{"tokens": [...], "max_length": N, ...extra}`` atomically."""
        rundir.write_text(path, json.dumps({"tokens": self.tokens, "max_length": self.max_length, **extra},
                                           indent=0) + "\n")

    @classmethod
    def load(cls, path):
        """Reads a saved vocabulary.

        Raises:
            DatasetError: the file is missing (a model's run folder holds it) or is not a vocabulary.
        """
        path = Path(path)
        if not path.is_file():
            raise DatasetError(f"No vocabulary at {path}: a captioning model needs the vocabulary.json of its run "
                               "beside it.")
        try:
            content = json.loads(read_text(path))
            return cls(content["tokens"], content["max_length"])
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise DatasetError(f"{path} is not a vocabulary file ({type(error).__name__}: {error}).") from None

    def encode(self, captions):
        """Word ids of ``<start> w1 ... wn <end>`` for each caption, cut to ``max_length`` words;
        a word not in the vocabulary is ``<unk>`` (as ``keras.layers.StringLookup`` over
        ``tokens[2:]`` with mask ``""`` and OOV token ``<unk>`` numbers them; tested equal).

        Returns:
            ``(num_captions, max_length + 2)`` int32 numpy array padded with 0, and the
            ``(num_captions,)`` int32 lengths (with ``<start>`` and ``<end>``).
        """
        import numpy as np

        words = tokenize(captions)
        ids = np.zeros((len(words), self.max_length + 2), np.int32)
        lengths = np.zeros(len(words), np.int32)
        for row, caption in enumerate(words):
            sequence = [START_ID] + [self.ids.get(word, UNK_ID) for word in caption[:self.max_length]] + [END_ID]
            ids[row, :len(sequence)] = sequence
            lengths[row] = len(sequence)
        return ids, lengths

    def decode(self, ids):
        """The words of one id sequence as text, up to ``<end>``, without padding or ``<start>``."""
        words = []
        for index in ids:
            index = int(index)
            if index == END_ID:
                break
            if index not in (PAD_ID, START_ID):
                words.append(self.tokens[index])
        return " ".join(words)


def caption_scores(references, candidates, meteor=None):
    """Corpus BLEU-1..4 and CIDEr-D (and METEOR) from the COCO caption evaluation code
    (``pycocoevalcap``, the implementation the captioning papers report).

    Both sides are compared as given (already ``standardize``d words joined by spaces);
    the COCO code's PTB tokenizer, which needs Java, is not run. BLEU is the COCO
    variant: corpus-level, up to 4-grams, brevity penalty against the closest reference
    length. ``Cider`` there is CIDEr-D (clipped counts, Gaussian length penalty, x10).

    Args:
        references: per image, a list of reference captions (strings).
        candidates: per image, one generated caption (string).
        meteor: compute METEOR (needs ``java`` on PATH; default: when it is there).

    Returns:
        ``{"bleu1".."bleu4": float in [0, 1], "cider_d": float >= 0 (about 0..10), "meteor": float or None}``.

    Raises:
        ValueError: the lists differ in length, are empty, or an image has no reference.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if len(references) != len(candidates) or not candidates:
        raise ValueError(f"references and candidates must be non-empty and of equal length. "
                         f"Received: {len(references)} and {len(candidates)}")
    if any(not refs for refs in references):
        raise ValueError("Every image needs at least one reference caption.")
    gts = {i: list(refs) for i, refs in enumerate(references)}
    res = {i: [candidate if candidate.strip() else "<empty>"] for i, candidate in enumerate(candidates)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    scores = {f"bleu{n}": float(value) for n, value in enumerate(bleu, 1)}
    scores["cider_d"] = float(cider)
    scores["meteor"] = None
    if meteor or (meteor is None and shutil.which("java")):
        try:
            scores["meteor"] = _meteor_score(gts, res)
        except (OSError, subprocess.SubprocessError, ValueError) as error:
            logger.warning("METEOR not computed (%s: %s)", type(error).__name__, error)
    return scores


def _meteor_score(gts, res):
    scorer = _meteor()
    try:
        return float(scorer.compute_score(gts, res)[0])
    except BaseException:
        _meteor.cache_clear()  # a scorer that failed half-way is not used again; its lock is freed and
        if scorer.lock.locked():  # its pipe closed here, so that its __del__ stops its Java process quietly
            scorer.lock.release()
        try:
            scorer.meteor_p.stdin.close()
        except OSError:
            pass
        raise


@functools.cache
def _meteor():
    """One METEOR scorer per process: its Java process loads the paraphrase tables once (about 17 s
    on a 2-core CPU) and then scores any number of caption sets (greedy, beam, val, test)."""
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()


class CiderD:
    """CIDEr-D of single captions against their image's references, with the n-grams' document
    frequencies fixed by a corpus: self-critical sequence training's reward (Rennie et al., CVPR
    2017, take them from the training references, so that a caption's reward does not depend
    on the batch it is scored in).

    The formula is the COCO caption evaluation code's (``pycocoevalcap``'s ``CiderScorer``,
    whose n-gram counting ``precook`` is used here): 1- to 4-grams weighted by tf-idf, clipped
    counts, a Gaussian length penalty (sigma 6), averaged over the references, x10. Scoring the
    corpus's own images gives exactly ``pycocoevalcap``'s ``Cider`` on that corpus (its
    document frequencies are the evaluated set's). That code scores a whole set at once and
    cannot keep the corpus's frequencies for a batch, hence this class.

    Args:
        references: per image of the corpus, its reference captions (``standardize``d words
            joined by spaces); at least one image, each with at least one reference.

    Raises:
        ValueError: no image, or an image without references.
    """

    N, SIGMA = 4, 6.0

    def __init__(self, references):
        from pycocoevalcap.cider.cider_scorer import precook

        if not references or any(not refs for refs in references):
            raise ValueError("CiderD needs at least one image, each with at least one reference caption.")
        self._precook = precook
        self._cooked = [[precook(ref, self.N) for ref in refs] for refs in references]
        self._frequency = collections.Counter(gram for refs in self._cooked for gram in {g for ref in refs for g in ref})
        self._log_images = math.log(len(references))
        self._reference_vectors = {}

    def _vector(self, counts):
        vector, norm, length = [{} for _ in range(self.N)], [0.0] * self.N, 0
        for gram, count in counts.items():
            n = len(gram) - 1
            vector[n][gram] = weight = count * (self._log_images - math.log(max(1.0, self._frequency[gram])))
            norm[n] += weight * weight
            if n == 1:  # as pycocoevalcap: the length is the count of bigrams
                length += count
        return vector, [math.sqrt(x) for x in norm], length

    def _references(self, image):
        if image not in self._reference_vectors:
            self._reference_vectors[image] = [self._vector(counts) for counts in self._cooked[image]]
        return self._reference_vectors[image]

    def scores(self, images, candidates):
        """Each candidate's CIDEr-D against its image's references.

        Args:
            images: per candidate, the index of its image in ``references``.
            candidates: caption strings, as the references.

        Returns:
            ``(len(candidates),)`` float64 scores >= 0 (about 0..10).
        """
        import numpy as np

        out = []
        for image, candidate in zip(images, candidates):
            vector, norm, length = self._vector(self._precook(candidate, self.N))
            references = self._references(int(image))
            total = 0.0
            for ref_vector, ref_norm, ref_length in references:
                penalty = math.exp(-((length - ref_length) ** 2) / (2 * self.SIGMA ** 2))
                for n in range(self.N):
                    ref = ref_vector[n]
                    value = sum(min(weight, ref.get(gram, 0.0)) * ref.get(gram, 0.0) for gram, weight in vector[n].items())
                    if norm[n] and ref_norm[n]:
                        value /= norm[n] * ref_norm[n]
                    total += value * penalty / self.N
            out.append(10.0 * total / len(references))
        return np.array(out, np.float64)
