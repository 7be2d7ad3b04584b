from kedro.pipeline import Pipeline, node

from .nodes import compute_metrics, plot_results, plot_scorer_comparison, write_html_report


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                compute_metrics,
                inputs=[
                    "predictions",
                    "anomaly_maps",
                    "scorer_maps",
                    "fusion",
                    "dfd_model",
                    "scoring_timing",
                    "defect_type_metrics",
                    "working_size",
                    "params:k_shot",
                    "params:k_defect_shots",
                    "params:seed",
                    "params:evaluation",
                    "params:data.mask_threshold",
                ],
                outputs=["metrics", "roc_curve"],
                name="compute_metrics",
            ),
            node(
                plot_results,
                inputs=["predictions", "anomaly_maps", "fusion", "working_size", "params:evaluation",
                        "params:data.mask_threshold"],
                outputs=["roc_figure", "pr_figure", "score_histogram", "anomaly_overlays"],
                name="plot_results",
            ),
            node(plot_scorer_comparison, inputs="metrics", outputs="scorer_comparison", name="plot_scorer_comparison"),
            node(
                write_html_report,
                inputs=[
                    "predictions",
                    "anomaly_maps",
                    "metrics",
                    "fusion",
                    "defect_types",
                    "defect_type_metrics",
                    "working_size",
                    "params:evaluation",
                ],
                outputs="html_report",
                name="write_html_report",
            ),
        ],
        tags="evaluation",
    )
