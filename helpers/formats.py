"""File formats the project reads. Standard library only: the tools import it.

``IMAGE_EXTENSIONS`` are the extensions Keras' ``flow_from_directory`` reads
(``DirectoryIterator.white_list_formats``; a test checks they agree), lower case.
``read_text`` reads the text files of a dataset (``wnids.txt``, ``words.txt``,
``val_annotations.txt``). ``file_digest`` hashes a file's bytes (identical files, whatever their names).
"""

import hashlib
from pathlib import Path

from helpers.errors import UsageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff")


def read_text(path):
    """A text file's content: UTF-8, a leading byte-order mark dropped (``utf-8-sig``).

    Raises:
        UsageError: the file is not UTF-8 text (the file and the first bad byte are named).
    """
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise UsageError(f"{path} is not UTF-8 text (byte {error.object[error.start]:#x} at offset "
                         f"{error.start}); save it as UTF-8.") from None


def file_digest(path):
    """BLAKE2b (16 bytes, hex) of a file's bytes: identical files, whatever their names."""
    with open(path, "rb") as handle:
        return hashlib.blake2b(handle.read(), digest_size=16).hexdigest()
