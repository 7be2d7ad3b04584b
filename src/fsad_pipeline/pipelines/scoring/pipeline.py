from kedro.pipeline import Pipeline, node

from .nodes import fit_score_fusion, score_test_images


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                fit_score_fusion,
                inputs=[
                    "dfd_model",
                    "patch_scorers",
                    "patch_validation",
                    "support_images",
                    "fusion_validation",
                    "manifest",
                    "support_selection",
                    "params:fusion",
                    "params:threshold",
                    "params:winclip",
                    "params:data",
                    "working_size",
                    "params:seed",
                    "params:device",
                ],
                outputs="fusion",
                name="fit_score_fusion",
            ),
            node(
                score_test_images,
                inputs=[
                    "manifest",
                    "defect_shots",
                    "dfd_model",
                    "patch_scorers",
                    "support_images",
                    "fusion",
                    "params:data",
                    "params:scoring",
                    "params:winclip",
                    "working_size",
                    "params:device",
                ],
                outputs=["predictions", "anomaly_maps", "scorer_maps", "scoring_timing"],
                name="score_test_images",
            ),
        ],
        tags="scoring",
    )
