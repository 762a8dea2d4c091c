"""The choices of the shared flags. Standard library only, so that the command line is
parsed (and ``--help`` answers) before TensorFlow is imported."""

MIXED_PRECISION = ("auto", "off", "bfloat16", "float16")  # helpers.precision.resolve
DISTRIBUTE = ("none", "mirrored", "multi-worker")  # helpers.distribute.make_strategy
