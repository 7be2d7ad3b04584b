from importlib import import_module

from kedro.pipeline import Pipeline

#: The stages of the ``dfd`` chain, in data-flow order.
DFD_STAGES = ("ingestion", "synthesis", "training", "memory_bank", "scoring", "classification", "evaluation")


def create_pipeline(**kwargs) -> Pipeline:
    stages = (import_module(f"fsad_pipeline.pipelines.{stage}").create_pipeline() for stage in DFD_STAGES)
    return sum(stages, Pipeline([]))
