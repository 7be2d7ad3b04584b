from kedro.pipeline import Pipeline, node

from .nodes import build_image_manifest, resolve_working_size, select_labelled_defects, select_support_shots


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                build_image_manifest,
                inputs=["params:data", "params:k_shot"],
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
                resolve_working_size,
                inputs=[
                    "manifest", "params:image_size", "params:image_layout", "params:image_size_multiple",
                    "params:image_max_upscale",
                ],
                outputs="working_size",
                name="resolve_working_size",
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
