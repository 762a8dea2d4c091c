"""Runs a script of the repository in this process with the tests' stand-in backbones
(``tests.conftest.stand_in_backbone``) in place of Xception and VGG16, for tests whose point is a
fresh process (multi-worker clusters, logical devices) rather than the backbone::

    python -m tests.stand_in cnn_rnn_classifier.py --data-dir ... (the script's own arguments)
"""

import runpy
import sys

from helpers import backbones
from tests.conftest import stand_in_backbone


def install():
    """Every ``helpers.backbones.Backbone`` of this process builds its stand-in from now on."""
    backbones.Backbone.constructor = stand_in_backbone


if __name__ == "__main__":
    install()
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
