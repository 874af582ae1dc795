"""Compile the pipelines to KFP IR YAML, the file Vertex AI Pipelines runs.

The checked-in ``pipeline.yaml`` at the repository root is this function's output for the
current code (a test recompiles and compares).
"""
from __future__ import annotations

from kfp import compiler


def compile_pipeline(output: str = "pipeline.yaml") -> str:
    """Compile the full training pipeline to ``output`` and return the path."""
    from pipelines.training_pipeline import clipa_training

    compiler.Compiler().compile(pipeline_func=clipa_training, package_path=output)
    return output
