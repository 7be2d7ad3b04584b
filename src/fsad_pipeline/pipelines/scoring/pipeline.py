from kedro.pipeline import Pipeline, node

from .nodes import score_test_images


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                score_test_images,
                inputs=["manifest", "dfd_model", "params:data", "params:scoring"],
                outputs=["predictions", "anomaly_maps", "scoring_timing"],
                name="score_test_images",
            )
        ],
        tags="scoring",
    )
