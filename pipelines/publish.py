"""Publishing steps of the training pipeline that only Vertex AI runs: the Model Registry upload.

The export itself is a component (components/export.py); this is the DAG fragment that
hands its folder to google-cloud-pipeline-components' ``ModelUploadOp``.
"""
from kfp import dsl


def register_model(exp, serving_image):
    """Upload the export to Vertex AI Model Registry (GCPC's ModelUploadOp), served by ``serving_image``.

    The folder becomes an UnmanagedContainerModel (importer) whose container is the user's;
    the card's name, summary and labels become the model's display name, description and labels.

    Args:
        exp: the ``export`` task (outputs artifact_uri, display_name, description, labels).
        serving_image: the serving container image URI (a pipeline parameter).
    Returns:
        The ModelUploadOp task (output ``model``: the google.VertexModel version).
    """
    from google_cloud_pipeline_components import _placeholders
    from google_cloud_pipeline_components.types.artifact_types import UnmanagedContainerModel
    from google_cloud_pipeline_components.v1.model import ModelUploadOp

    served = dsl.importer(artifact_uri=exp.outputs["artifact_uri"],
                          artifact_class=UnmanagedContainerModel,
                          metadata={"containerSpec": {"imageUri": serving_image}})
    served.set_display_name("serving-model")
    upload = ModelUploadOp(display_name=exp.outputs["display_name"],
                           unmanaged_container_model=served.output,
                           description=exp.outputs["description"], labels=exp.outputs["labels"],
                           # the pipeline job's own region, which Vertex substitutes
                           location=_placeholders.LOCATION_PLACEHOLDER)
    upload.set_display_name("model-registry-upload")
    return upload
