"""File formats the project reads, by extension. Standard library only: the tools import it.

``IMAGE_EXTENSIONS`` are the extensions Keras' ``flow_from_directory`` reads
(``DirectoryIterator.white_list_formats``; a test checks they agree), lower case.
"""

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff")
