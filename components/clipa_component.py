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

# Default images (issue: built from this repo's Dockerfiles and pushed by the user).
DATA_IMAGE = "us-docker.pkg.dev/your-project/clipa/clipa-data:0.1.0"
TRAIN_IMAGE = "us-docker.pkg.dev/your-project/clipa/clipa-train:0.1.0"


def clipa_component(image: str = TRAIN_IMAGE):
    """``dsl.component`` with this project's conventions (image, no kfp install)."""
    if os.environ.get("_KFP_RUNTIME") == "true":
        # Inside a running component kfp.dsl has no `component`; the body only needs the
        # plain functions of its module, so the decorator is a no-op there.
        return lambda func: func
    return functools.partial(dsl.component, base_image=image, install_kfp_package=False)
