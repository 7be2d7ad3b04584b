from kedro.pipeline import Pipeline, node

from .nodes import classify_defect_types, evaluate_defect_types, fit_defect_classifier


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                fit_defect_classifier,
                inputs=[
                    "support_images",
                    "foreground_masks",
                    "defect_shots",
                    "patch_scorers",
                    "params:synthesis.textures",
                    "params:classification",
                    "working_size",
                    "params:seed",
                    "params:device",
                ],
                outputs=["defect_classifier", "classification_training"],
                name="fit_defect_classifier",
            ),
            node(
                classify_defect_types,
                inputs=["predictions", "defect_classifier", "params:classification", "working_size"],
                outputs="defect_types",
                name="classify_defect_types",
            ),
            node(
                evaluate_defect_types,
                inputs=["defect_types", "defect_classifier"],
                outputs=["defect_type_metrics", "defect_type_confusion"],
                name="evaluate_defect_types",
            ),
        ],
        tags="classification",
    )
