from kedro.pipeline import Pipeline, node

from .nodes import select_base_images, train_base_encoder


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                select_base_images,
                inputs=["params:base_training", "params:data", "params:seed"],
                outputs="base_split",
                name="select_base_images",
            ),
            node(
                train_base_encoder,
                inputs=["base_split", "params:base_training", "params:backbone", "params:synthesis", "params:seed", "params:device"],
                outputs=["base_encoder", "base_training_history", "base_training_curves"],
                name="train_base_encoder",
            ),
        ],
        tags="base_training",
    )
