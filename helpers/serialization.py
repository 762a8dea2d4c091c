"""How the project's layers, cells and optimizers are registered for safe-mode loading."""

import keras

PACKAGE = "helpers"  # saved models name these classes "helpers>ChannelMean", "helpers>FusedLSTM", ...
LEGACY_PACKAGE = "cnn_rnn"  # the package of checkpoints written by earlier versions, still loaded


def serializable(legacy_name=None):
    """``keras.saving.register_keras_serializable(package=PACKAGE)``, plus the class's earlier
    registered name (``cnn_rnn>`` + ``legacy_name`` or the class name) so that older
    checkpoints still load in safe mode."""

    def register(cls):
        cls = keras.saving.register_keras_serializable(package=PACKAGE)(cls)
        keras.saving.get_custom_objects()[f"{LEGACY_PACKAGE}>{legacy_name or cls.__name__}"] = cls
        return cls

    return register
