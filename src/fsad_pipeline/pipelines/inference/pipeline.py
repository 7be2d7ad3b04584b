from kedro.pipeline import Pipeline, node

from .nodes import inspect_new_images


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                inspect_new_images,
                inputs=[
                    "params:inference",
                    "params:data",
                    "params:backbone",
                    "params:image_size",
                    "params:config_version",
                    "params:device",
                ],
                outputs="inference_summary",
                name="inspect_new_images",
            )
        ],
        tags="inference",
    )
