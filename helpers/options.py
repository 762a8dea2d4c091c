"""The choices of the shared flags. Standard library only, so that the command line is
parsed (and ``--help`` answers) before TensorFlow is imported."""

MIXED_PRECISION = ("auto", "off", "bfloat16", "float16")  # helpers.precision.resolve
DISTRIBUTE = ("none", "mirrored", "multi-worker")  # helpers.distribute.make_strategy
LR_SCHEDULES = ("constant", "cosine", "plateau")  # helpers.training.Trainer.learning_rate
CLASS_WEIGHTS = ("none", "balanced")  # helpers.training.balanced_class_weights
EXPORT_FORMATS = ("saved_model", "tflite", "onnx")  # helpers.export.export_model
TTA = ("none", "flip")  # helpers.layers.flip_averaged
