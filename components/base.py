"""What every clipa component shares: its container images and the decorator.

The package is installed in each image (built from this repo's pyproject extras), so a
component needs no ``packages_to_install`` and the image carries kfp itself. The work of
each step lives in a plain function next to its component; the component body only
imports that function (imports only the container has go inside the body) and calls it.
"""
from __future__ import annotations

import functools
import os

from kfp import dsl

# Default images; `clipa compile --data-image/--train-image` overrides them at compile time.
DATA_IMAGE = "us-docker.pkg.dev/your-project/clipa/clipa-data:0.1.0"
TRAIN_IMAGE = "us-docker.pkg.dev/your-project/clipa/clipa-train:0.1.0"


def clipa_component(image: str = TRAIN_IMAGE):
    """``dsl.component`` with this project's conventions (image, no kfp install)."""
    return functools.partial(dsl.component, base_image=image, install_kfp_package=False)
