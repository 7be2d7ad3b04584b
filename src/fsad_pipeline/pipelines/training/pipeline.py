from kedro.pipeline import Pipeline, node

from .nodes import train_dfd_model


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                train_dfd_model,
                inputs=[
                    "pseudo_anomalies",
                    "synthetic_validation",
                    "params:backbone",
                    "working_size",
                    "params:features",
                    "params:dfd",
                    "params:threshold",
                    "params:seed",
                    "params:device",
                ],
                outputs=["dfd_model", "training_history", "training_curves"],
                name="train_dfd_model",
            )
        ],
        tags="training",
    )
