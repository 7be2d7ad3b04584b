from kedro.pipeline import Pipeline, node

from .nodes import build_image_manifest, select_labelled_defects, select_support_shots


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                build_image_manifest,
                inputs="params:data",
                outputs=["manifest", "ingestion_rejects"],
                name="build_image_manifest",
            ),
            node(
                select_support_shots,
                inputs=["manifest", "params:k_shot", "params:seed", "params:support_rounds"],
                outputs="support_selection",
                name="select_support_shots",
            ),
            node(
                select_labelled_defects,
                inputs=["manifest", "params:k_defect_shots", "params:seed"],
                outputs="defect_shots",
                name="select_labelled_defects",
            ),
        ],
        tags="ingestion",
    )
