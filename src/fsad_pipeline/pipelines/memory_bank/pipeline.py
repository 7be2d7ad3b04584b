from kedro.pipeline import Pipeline, node

from .nodes import augment_support_images, build_fusion_validation, fit_memory_banks


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                augment_support_images,
                inputs=["support_images", "params:support_augmentation"],
                outputs="augmented_support",
                name="augment_support_images",
            ),
            node(
                build_fusion_validation,
                inputs=["synthetic_validation", "defect_shots", "manifest", "working_size", "params:fusion.defect_views",
                        "params:data.mask_threshold"],
                outputs="fusion_validation",
                name="build_fusion_validation",
            ),
            node(
                fit_memory_banks,
                inputs=[
                    "augmented_support",
                    "support_images",
                    "fusion_validation",
                    "defect_shots",
                    "manifest",
                    "params:backbone",
                    "working_size",
                    "params:memory_bank",
                    "params:seed",
                    "params:device",
                    "params:data.mask_threshold",
                ],
                outputs=["patch_scorers", "patch_validation"],
                name="fit_memory_banks",
            ),
        ],
        tags="memory_bank",
    )
