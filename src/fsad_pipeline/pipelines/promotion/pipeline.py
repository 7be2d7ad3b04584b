from kedro.pipeline import Pipeline, node

from .nodes import promote_model


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                promote_model,
                inputs=[
                    "dfd_model",
                    "patch_scorers",
                    "defect_classifier",
                    "fusion",
                    "support_images",
                    "metrics",
                    "fusion_validation",
                    "manifest",
                    "params:config_version",
                    "params:winclip",
                    "params:model_store",
                    "params:promotion",
                ],
                outputs="promotion_record",
                name="promote_model",
            )
        ],
        tags="promotion",
    )
