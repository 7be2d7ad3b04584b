from kedro.pipeline import Pipeline, node

from .nodes import (
    build_texture_bank,
    compute_foreground_masks,
    load_support_images,
    load_validation_images,
    plot_family_examples,
    plot_pseudo_anomaly_examples,
    synthesize_training_set,
    synthesize_validation_set,
)

_SET_INPUTS = ["support_images", "foreground_masks", "texture_bank", "params:synthesis", "params:seed"]


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                load_support_images,
                inputs=["support_selection", "working_size", "params:data"],
                outputs="support_images",
                name="load_support_images",
            ),
            node(build_texture_bank, inputs="params:synthesis.textures", outputs="texture_bank", name="build_texture_bank"),
            node(
                compute_foreground_masks,
                inputs=["support_images", "params:synthesis.foreground"],
                outputs="foreground_masks",
                name="compute_foreground_masks",
            ),
            node(synthesize_training_set, inputs=_SET_INPUTS, outputs="pseudo_anomalies", name="synthesize_training_set"),
            node(
                load_validation_images,
                inputs=[
                    "manifest", "support_selection", "working_size", "params:data", "params:synthesis",
                    "params:fusion", "params:threshold", "params:seed",
                ],
                outputs="validation_images",
                name="load_validation_images",
            ),
            node(
                synthesize_validation_set,
                inputs=[*_SET_INPUTS, "validation_images"],
                outputs="synthetic_validation",
                name="synthesize_validation_set",
            ),
            node(
                plot_pseudo_anomaly_examples,
                inputs=["pseudo_anomalies", "params:synthesis.n_examples"],
                outputs="pseudo_anomaly_examples",
                name="plot_pseudo_anomaly_examples",
            ),
            node(
                plot_family_examples,
                inputs=["synthetic_validation", "params:synthesis.n_examples"],
                outputs="validation_family_examples",
                name="plot_validation_family_examples",
            ),
        ],
        tags="synthesis",
    )
