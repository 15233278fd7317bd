"""The workbook: parameters and runs (papermill), the built-in models, the per-run report, the
decision, the tables the notebooks show, Ray sweeps and PDF printing."""
